"""The built-in data sources. train.py's DATA_SOURCES table maps names to these.

Each takes the location of its data and the run's config (image size, channels,
split, caps, batch size, seed) and returns (train_ds, val_ds, info), as any
load_data must.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf

from engine import cache as image_cache
from engine.config import RunConfig, UserError
from engine.decoding import resize_image
from engine.images import (
    IMAGE_EXTENSIONS,
    DataInfo,
    _cap,
    arrays_pipeline,
    files_pipeline,
    image_shape,
    label_index,
    memory_pipeline,
)

Pipelines = tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]
DEMO_CLASSES = ("parasitized", "uninfected")
DEFAULT_TFDS_DIR = "/storage/tfdata"


def require_path(path_text: str, what: str) -> Path:
    """The path the user gave, which must exist; UserError saying what to give otherwise."""
    if not path_text:
        raise UserError(f"--data-dir is required for this data source: give {what}")
    path = Path(path_text).expanduser()
    if not path.exists():
        raise UserError(f"data path {path} does not exist: give {what} with --data-dir")
    return path


# ----------------------------------------------------------------------------
# imagedir: one sub-folder per class
# ----------------------------------------------------------------------------


def image_files(folder: Path) -> list[str]:
    """The image files under folder, at any depth, sorted (os.walk: 3x pathlib's speed)."""
    found = []
    for parent, _, names in os.walk(folder, followlinks=True):
        found += [os.path.join(parent, name) for name in names
                  if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]  # fmt: skip
    return sorted(found)


def load_imagedir(folder: str, cfg: RunConfig) -> Pipelines:
    """One sub-folder per class, images of any size, PNG/JPEG/BMP/GIF, gray or RGB."""
    root = require_path(folder, "a folder with one sub-folder of images per class")
    if not root.is_dir():
        raise UserError(f"{root} is a file; imagedir needs a folder of class sub-folders")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = " (it holds images directly: move them into one sub-folder per class)"
        raise UserError(f"{root} has no class sub-folders{hint if loose else ''}")
    paths, labels, empty = [], [], []
    for index, class_dir in enumerate(class_dirs):
        files = image_files(class_dir)
        if not files:
            empty.append(class_dir.name)
        paths += files
        labels += [index] * len(files)
    if empty:
        raise UserError(
            f"class folder(s) {', '.join(empty)} in {root} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)"
        )
    return files_pipeline(paths, labels, [d.name for d in class_dirs], cfg, "imagedir")


# ----------------------------------------------------------------------------
# dataframe: a CSV or JSON table of paths and labels
# ----------------------------------------------------------------------------


def read_table(table: Path) -> list[dict]:
    """The rows of a .csv or .json table; JSON as records or as {column: [values]}."""
    if table.suffix.lower() == ".csv":
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
    elif table.suffix.lower() == ".json":
        rows = json.loads(table.read_text())
        if isinstance(rows, dict):
            try:
                columns = zip(*rows.values(), strict=True)
                rows = [dict(zip(rows, values, strict=True)) for values in columns]
            except ValueError as err:
                raise UserError(f"{table}: its columns have different lengths") from err
    else:
        raise UserError(f"{table}: tables of image paths must be .csv or .json")
    if not rows:
        raise UserError(f"{table} has no rows")
    return rows


def table_paths(table: Path, values: list) -> list[str]:
    """A table's image paths made absolute (relative ones from its folder); all must exist."""
    paths = [str((table.parent / str(value)).resolve()) for value in values]
    absent = [p for p in paths if not os.path.exists(p)]
    if absent:
        raise UserError(
            f"{len(absent)} image path(s) in {table} do not exist, e.g. {absent[0]}. "
            "Fix the paths (relative ones are read from the table's folder)."
        )
    return paths


def table_column(table: Path, rows: list[dict], column: str, flag: str) -> list:
    """One column's values; UserError naming the table's columns and the flag when absent."""
    if column not in rows[0]:
        raise UserError(
            f"{table} has no column '{column}'; its columns are {', '.join(rows[0])}. "
            f"Name the column with {flag}."
        )
    return [row[column] for row in rows]


def load_dataframe(table_text: str, cfg: RunConfig, path_column: str, label_column: str):
    """A CSV or JSON table (e.g. a saved query result) of image paths and labels.

    Relative paths are taken relative to the table's folder. JSON is a list of
    records, [{"path": "...", "label": "..."}, ...], or {column: [values]}.
    """
    table = require_path(table_text, "a .csv or .json table of image paths and labels")
    rows = read_table(table)
    raw_paths = table_column(table, rows, path_column, "--path-column")
    raw_labels = table_column(table, rows, label_column, "--label-column")
    paths = table_paths(table, raw_paths)
    labels, class_names = label_index(raw_labels)
    return files_pipeline(paths, labels, class_names, cfg, "dataframe")


# ----------------------------------------------------------------------------
# arrays: images and labels in one .npz or HDF5 file
# ----------------------------------------------------------------------------


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array in a .npz or HDF5 file, by name."""
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if path.suffix.lower() in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as data:
            return {k: data[k][()] for k in data if isinstance(data[k], h5py.Dataset)}
    raise UserError(f"{path}: the arrays source reads .npz, .h5 or .hdf5 files")


def load_arrays(path_text: str, cfg: RunConfig) -> Pipelines:
    """Images and labels in one .npz or HDF5 file.

    Keys: `images` (N, H, W[, C]) with pixel values 0..255 (floats in 0..1 are
    scaled up), `labels` (N,) integers or one-hot (N, K), optional `class_names`.
    `x` / `y` are accepted for images / labels.
    """
    path = require_path(path_text, "a .npz or .h5 file with images and labels")
    data = read_arrays(path)
    images = data.get("images", data.get("x"))
    labels = data.get("labels", data.get("y"))
    if images is None or labels is None:
        raise UserError(f"{path} needs arrays named images and labels; it has {sorted(data)}")
    if images.ndim not in (3, 4) or len(images) != len(labels):
        raise UserError(
            f"{path}: images must be (N, H, W[, C]) with one label each; got images "
            f"{images.shape} and labels {labels.shape}"
        )
    if labels.ndim == 2:
        labels = labels.argmax(axis=1)
    if images.dtype.kind == "f" and images.max() <= 1.0:
        images = images * 255.0
    if images.ndim == 3:
        images = images[..., np.newaxis]
    indices, names = label_index(labels.astype(np.int64).tolist())
    if "class_names" in data and len(data["class_names"]) >= len(names):
        given = [str(n, "utf-8") if isinstance(n, bytes) else str(n) for n in data["class_names"]]
        names = [given[int(n)] for n in names]
    return arrays_pipeline(images, np.array(indices), names, cfg, "arrays")


# ----------------------------------------------------------------------------
# tfds: a TensorFlow Datasets dataset already on disk
# ----------------------------------------------------------------------------


def load_tfds(name: str, data_dir: str, cfg: RunConfig) -> Pipelines:
    """A TensorFlow Datasets dataset (e.g. malaria), split from its train split by percent.

    The data must already be in data_dir (`make load_tfdata` downloads it): nothing
    is downloaded during training.
    """
    import tensorflow_datasets as tfds

    data_dir = data_dir or DEFAULT_TFDS_DIR
    val_percent = max(1, round(cfg.val_split * 100))
    splits = [f"train[:{100 - val_percent}%]", f"train[{100 - val_percent}%:]"]
    try:
        (train_raw, val_raw), ds_info = tfds.load(
            name,
            split=splits,
            data_dir=data_dir,
            as_supervised=True,
            with_info=True,
            download=False,
        )
    except tfds.core.registered.DatasetNotFoundError as err:
        raise UserError(f"TFDS has no dataset named '{name}': {err}") from err
    except (AssertionError, FileNotFoundError) as err:
        raise UserError(
            f"TFDS dataset '{name}' is not in {data_dir}. Download it first with "
            f"`make load_tfdata DATASET={name} TFDS_DIR={data_dir}`, or point "
            "--data-dir at the folder that holds it."
        ) from err
    class_names = list(ds_info.features["label"].names)
    if len(class_names) < 2:
        raise UserError(f"TFDS dataset '{name}' has fewer than two classes")
    counts = [_cap(_count(train_raw), cfg.training_samples),
              _cap(_count(val_raw), cfg.validation_samples)]  # fmt: skip
    shape = image_shape(cfg)

    def pipeline(raw: tf.data.Dataset, split: str, count: int, training: bool):
        def decode(indices: list[int]) -> image_cache.Decoded:
            """Resize the split's first max(indices) + 1 examples; keep those asked for."""
            end = max(indices) + 1
            images, labels = np.empty((end, *shape), np.uint8), np.empty(end, np.int64)
            resized = raw.take(end).map(
                lambda x, y: (resize_image(x, shape[0], shape[2]), y),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            start = 0
            for x, y in resized.batch(256).as_numpy_iterator():
                images[start : start + len(x)], labels[start : start + len(x)] = x, y
                start += len(x)
            return image_cache.Decoded(images[indices], labels[indices])

        # The cache knows an example by dataset, version, split (with its slice) and index.
        keys = [f"tfds:{name}:{ds_info.version}:{split}:{i}" for i in range(count)]
        decoded = image_cache.load_images(keys, decode, cfg.cache, cfg.cache_dir, shape)
        return memory_pipeline(decoded.images, decoded.labels, cfg, training)

    info = DataInfo(shape, class_names, counts[0], counts[1], [], f"tfds:{name}")
    return (pipeline(train_raw, splits[0], counts[0], True),
            pipeline(val_raw, splits[1], counts[1], False), info)  # fmt: skip


def _count(ds: tf.data.Dataset) -> int:
    """Examples in a dataset: its known cardinality, or counted once when unknown."""
    known = int(ds.cardinality())
    return known if known >= 0 else int(ds.reduce(0, lambda n, _: n + 1))


def download_tfds(name: str, data_dir: str) -> int:
    """Download and prepare a TFDS dataset into data_dir (used by `make load_tfdata`).

    Returns:
        A process exit status: 0 on success, 1 with a message on failure.
    """
    import tensorflow_datasets as tfds

    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: cannot create {data_dir} ({err}). Create it with write access for "
              "this user, or choose another folder with TFDS_DIR=...", file=sys.stderr)  # fmt: skip
        return 1
    try:
        tfds.builder(name, data_dir=data_dir).download_and_prepare()
    except Exception as err:
        print(f"error: could not download TFDS dataset '{name}' into {data_dir}: {err}\n"
              "Check the network connection (this needs internet access) and the name.",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"{name} is ready in {data_dir}")
    return 0


# ----------------------------------------------------------------------------
# demo: synthetic malaria-like cells, made offline
# ----------------------------------------------------------------------------


def make_demo_data(directory: str | Path, samples: int, image_size: int = 64, seed: int = 0):
    """Write a synthetic, malaria-like imagedir dataset: one folder per class of PNGs.

    Each image is a round pink cell on a pale background; `parasitized` cells hold
    one to three small dark dots, `uninfected` ones a few faint pale blotches. The
    same arguments always give the same images.

    Args:
        directory: where the class folders go (created).
        samples: total number of images, split evenly between the two classes.
        image_size: width and height in pixels.
        seed: random seed.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    for name in DEMO_CLASSES:
        (Path(directory) / name).mkdir(parents=True, exist_ok=True)
    for i in range(samples):
        parasitized = i % 2 == 0
        image = np.empty((image_size, image_size, 3), np.float32)
        image[:] = rng.uniform(225, 245, 3)
        radius = rng.uniform(0.3, 0.42) * image_size
        center = image_size / 2 + rng.uniform(-0.08, 0.08, 2) * image_size
        squash = rng.uniform(0.85, 1.15)
        cell = ((rows - center[0]) * squash) ** 2 + ((cols - center[1]) / squash) ** 2 < radius**2
        image[cell] = rng.uniform([200, 120, 150], [230, 160, 190])
        n_spots = rng.integers(1, 4)
        for _ in range(n_spots):
            angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6) * radius
            spot_r = rng.uniform(0.04, 0.07) * image_size
            y, x = center[0] + dist * np.sin(angle), center[1] + dist * np.cos(angle)
            spot = (rows - y) ** 2 + (cols - x) ** 2 < spot_r**2
            colour = [90, 30, 110] if parasitized else [235, 190, 210]
            image[spot & cell] = colour
        image += rng.normal(0, 6, image.shape)
        pixels = np.clip(image, 0, 255).astype(np.uint8)
        label = DEMO_CLASSES[0] if parasitized else DEMO_CLASSES[1]
        Image.fromarray(pixels).save(Path(directory) / label / f"cell_{i:05d}.png")


def load_demo(folder: str | Path, samples: int, cfg: RunConfig) -> Pipelines:
    """The offline synthetic dataset: made on first use (see make_demo_data), then imagedir."""
    if samples < 4:
        raise UserError(f"demo_samples must be at least 4, got {samples}")
    directory = Path(folder)
    stamp = directory / "demo.json"
    recipe = {"samples": samples, "image_size": 64, "seed": 0, "version": 1}
    if not stamp.exists() or json.loads(stamp.read_text()) != recipe:
        print(f"making {samples} synthetic demo images in {directory} ...")
        for class_name in DEMO_CLASSES:
            for old in (directory / class_name).glob("*.png"):
                old.unlink()
        make_demo_data(directory, samples, recipe["image_size"], recipe["seed"])
        stamp.write_text(json.dumps(recipe))
    train_ds, val_ds, info = load_imagedir(str(directory), cfg)
    return train_ds, val_ds, dataclasses.replace(info, source="demo")
