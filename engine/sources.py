"""The built-in data sources. train.py's DATA_SOURCES table maps names to these.

Each takes the location of its data and the run's config (image size, channels,
split, caps, batch size, seed) and returns (train_ds, val_ds, info), as any
load_data must. They live in two modules, by how their images arrive:

    imagedir   load_imagedir(folder, cfg)                engine.file_sources
    dataframe  load_dataframe(table, cfg, columns ...)   engine.file_sources
    demo       load_demo(folder, samples, cfg)           engine.file_sources
    arrays     load_arrays(path, cfg)                    engine.array_sources
    tfds       load_tfds(name, data_dir, cfg)            engine.array_sources

This module is their one import path (`from engine import sources as src`). It imports
them on first use, so importing it (train.py does) loads no TensorFlow: `train.py --help`
answers in a second.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "engine.array_sources": (
        "DEFAULT_TFDS_DIR",
        "array_labels",
        "channels_last",
        "download_tfds",
        "load_arrays",
        "load_tfds",
        "read_arrays",
        "tfds_splits",
    ),
    "engine.file_sources": (
        "DEMO_CLASSES",
        "Pipelines",
        "load_dataframe",
        "load_demo",
        "load_imagedir",
        "make_demo_data",
        "read_table",
        "require_path",
        "table_column",
        "table_paths",
        "table_splits",
    ),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_HOME_OF)


def __getattr__(name: str) -> Any:
    """A source's name, imported from its module the first time it is asked for."""
    if name not in _HOME_OF:
        raise AttributeError(f"module 'engine.sources' has no attribute '{name}'")
    value = getattr(importlib.import_module(_HOME_OF[name]), name)
    globals()[name] = value
    return value
