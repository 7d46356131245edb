"""The built-in data sources. train.py's DATA_SOURCES table maps names to these.

Each takes the location of its data and the run's config (image size, channels,
split, caps, batch size, seed) and returns (train_ds, val_ds, info), as any
load_data must. They live in two modules, by how their images arrive:

    imagedir   load_imagedir(folder, cfg)                engine.file_sources
    dataframe  load_dataframe(table, cfg, columns ...)   engine.file_sources
    demo       load_demo(folder, samples, cfg)           engine.file_sources
    arrays     load_arrays(path, cfg)                    engine.array_sources
    tfds       load_tfds(name, data_dir, cfg)            engine.array_sources

This module is their one import path (`from engine import sources as src`).
"""

from engine.array_sources import (
    DEFAULT_TFDS_DIR,
    array_labels,
    channels_last,
    download_tfds,
    load_arrays,
    load_tfds,
    read_arrays,
    tfds_splits,
)
from engine.file_sources import (
    DEMO_CLASSES,
    Pipelines,
    load_dataframe,
    load_demo,
    load_imagedir,
    make_demo_data,
    read_table,
    require_path,
    table_column,
    table_paths,
    table_splits,
)

__all__ = [
    "DEFAULT_TFDS_DIR",
    "DEMO_CLASSES",
    "Pipelines",
    "array_labels",
    "channels_last",
    "download_tfds",
    "load_arrays",
    "load_dataframe",
    "load_demo",
    "load_imagedir",
    "load_tfds",
    "make_demo_data",
    "read_arrays",
    "read_table",
    "require_path",
    "table_column",
    "table_paths",
    "table_splits",
    "tfds_splits",
]
