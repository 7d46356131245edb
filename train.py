"""Train a Keras image classifier and log everything to MLflow.

Usage:
    python train.py --help                      # every parameter, its type and default
    python train.py --data-source demo --convolutions 3 --epochs 6
    python train.py --data-source imagedir --data-dir /storage/cells --epochs 10
    mlflow run . -P epochs=3                    # the MLproject `main` entry point

Two places to edit when you fork this:
    load_data(cfg)                                  -> (train_ds, val_ds, info)
    define_network(input_shape, num_classes, cfg)   -> keras.Model
Pick another dataset with --data-source (tfds, imagedir, dataframe, arrays, demo),
or add a loader function to LOADERS. Change the network in define_network().

Tracking goes to $MLFLOW_TRACKING_URI when it is set, otherwise to a local store
in this folder (mlflow.db + mlruns/), which `mlflow ui` shows.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

from engine import provenance

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TF's C++ start-up chatter

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parent
DATA_SOURCES = ("tfds", "imagedir", "dataframe", "arrays", "demo")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
DEMO_CLASSES = ("parasitized", "uninfected")


class UserError(Exception):
    """A problem the user can fix (bad parameter, missing data, unreachable server).

    main() prints its message without a traceback and exits with status 2.
    """


# ----------------------------------------------------------------------------
# Config: every knob, declared once. Flags and the MLproject mirror these names.
# ----------------------------------------------------------------------------


def knob(default, help_text: str):
    """A Config field with its help text (shown by --help)."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class Config:
    # data
    data_source: str = knob("tfds", "where images come from: " + ", ".join(DATA_SOURCES))
    dataset: str = knob("malaria", "TFDS dataset name (data_source=tfds)")
    data_dir: str = knob(
        "",
        "tfds: TFDS data folder (default /storage/tfdata); imagedir: folder with one "
        "sub-folder per class; dataframe: CSV/JSON table of paths and labels; arrays: "
        ".npz or .h5 file; demo: where the demo images are made (default ./data/demo)",
    )
    image_size: int = knob(128, "images are resized to image_size x image_size")
    channels: int = knob(3, "1 (grayscale) or 3 (RGB); images are converted to this")
    val_split: float = knob(0.2, "fraction of the data held out for validation")
    training_samples: int = knob(0, "use at most this many training images (0 = all)")
    validation_samples: int = knob(0, "use at most this many validation images (0 = all)")
    path_column: str = knob("path", "dataframe: the column holding image paths")
    label_column: str = knob("label", "dataframe: the column holding labels")
    demo_samples: int = knob(1000, "demo: how many synthetic images to make")
    cache: bool = knob(True, "keep decoded images in memory after the first epoch")
    # model
    convolutions: int = knob(0, "N >= 1: small CNN of N conv layers; 0: VGG16 transfer learning")
    weights: str = knob("imagenet", "VGG16 start weights: imagenet or none")
    fine_tune_layers: int = knob(0, "VGG16: unfreeze this many layers at the top of the base")
    dense_units: int = knob(128, "units in the dense layer before the output")
    dropout: float = knob(0.3, "dropout rate before the output layer")
    randomize_images: bool = knob(True, "augment training images (flips, rotation, zoom)")
    # training
    epochs: int = knob(5, "passes over the training data")
    batch_size: int = knob(32, "images per batch on each device")
    learning_rate: float = knob(1e-3, "Adam learning rate")
    seed: int = knob(42, "seeds Python, NumPy, TensorFlow and the data split")
    mixed_precision: str = knob("auto", "float16 compute: auto (on with a GPU), true or false")
    xla: bool = knob(False, "compile the training step with XLA")
    distribute: bool = knob(True, "train on all visible GPUs with MirroredStrategy")
    # tracking
    experiment_name: str = knob("image-classifier", "MLflow experiment (ignored under mlflow run)")
    run_name: str = knob("", "MLflow run name (default: made from the network and data)")
    registered_model_name: str = knob(
        "image-classifier", "register the model under this name ('' = do not register)"
    )
    model_alias: str = knob("candidate", "alias given to the new model version")
    export_savedmodel: bool = knob(True, "also log a TensorFlow Serving SavedModel")

    def validate(self) -> None:
        """Raise UserError naming the first bad value and what would be accepted."""
        checks = [
            (self.data_source in DATA_SOURCES,
             f"data_source '{self.data_source}' is unknown; use one of: {', '.join(DATA_SOURCES)}"),
            (self.epochs >= 1, f"epochs must be a positive integer, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be a positive integer, got {self.batch_size}"),
            (self.image_size >= 8, f"image_size must be at least 8 pixels, got {self.image_size}"),
            (self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}"),
            (0 < self.val_split < 1, f"val_split must be between 0 and 1, got {self.val_split}"),
            (self.training_samples >= 0 and self.validation_samples >= 0,
             "training_samples and validation_samples must be 0 (all) or positive"),
            (self.convolutions >= 0,
             f"convolutions must be 0 (VGG16) or a positive number, got {self.convolutions}"),
            (self.weights in ("imagenet", "none"),
             f"weights must be 'imagenet' or 'none', got '{self.weights}'"),
            (self.fine_tune_layers >= 0, "fine_tune_layers must be 0 or positive"),
            (self.dense_units >= 1, "dense_units must be positive"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}"),
            (self.mixed_precision in ("auto", "true", "false"),
             f"mixed_precision must be auto, true or false, got '{self.mixed_precision}'"),
            (self.demo_samples >= 4, "demo_samples must be at least 4"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.convolutions == 0:
            if self.image_size < 32:
                raise UserError(
                    f"VGG16 (convolutions=0) needs image_size >= 32, got {self.image_size}; "
                    "raise image_size or use the small CNN (convolutions >= 1)"
                )
            if self.weights == "imagenet" and self.channels != 3:
                raise UserError("VGG16 imagenet weights need channels=3 (RGB)")


# ----------------------------------------------------------------------------
# Data: load_data(cfg) -> (train_ds, val_ds, info)
# ----------------------------------------------------------------------------


@dataclass
class DataInfo:
    """What the network and the logs need to know about the data."""

    image_shape: tuple[int, int, int]  # (height, width, channels) after resizing
    class_names: list[str]
    train_count: int
    val_count: int
    skipped_files: list[str] = field(default_factory=list)  # unreadable images left out

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_data(cfg: Config) -> tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]:
    """Load the training and validation data chosen by cfg.data_source.

    Args:
        cfg: the run's Config.

    Returns:
        (train_ds, val_ds, info): batched tf.data pipelines yielding
        (float32 images with pixel values 0..255 of shape info.image_shape, int32 labels),
        the training one shuffled; and a DataInfo with class names and counts.

    Raises:
        UserError: the data is missing, empty, or has fewer than two classes.
    """
    return LOADERS[cfg.data_source](cfg)


def _image_shape(cfg: Config) -> tuple[int, int, int]:
    return (cfg.image_size, cfg.image_size, cfg.channels)


def _cap(count: int, limit: int) -> int:
    return min(count, limit) if limit else count


def _finish(ds: tf.data.Dataset, cfg: Config, training: bool, count: int) -> tf.data.Dataset:
    """Cache (as uint8, a quarter of float32's memory), shuffle, batch and prefetch."""
    if cfg.cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(count, 10_000), seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def resize_image(image: tf.Tensor, cfg: Config) -> tf.Tensor:
    """Any image tensor -> uint8 (image_size, image_size, channels)."""
    if image.shape.rank == 2:
        image = image[..., tf.newaxis]
    have = image.shape[-1]
    if have == 4:
        image = image[..., :3]
        have = 3
    if have == 1 and cfg.channels == 3:
        image = tf.image.grayscale_to_rgb(image)
    elif have == 3 and cfg.channels == 1:
        image = tf.image.rgb_to_grayscale(image)
    image = tf.image.resize(image, (cfg.image_size, cfg.image_size))  # bilinear, as Keras loaders
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _split_indices(count: int, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """A seeded shuffle split into (train, val) index arrays, each non-empty."""
    order = np.random.default_rng(cfg.seed).permutation(count)
    val_count = min(max(1, round(count * cfg.val_split)), count - 1)
    val, train = order[:val_count], order[val_count:]
    return train[: _cap(len(train), cfg.training_samples)], val[
        : _cap(len(val), cfg.validation_samples)
    ]


def is_readable_image(path: str) -> bool:
    """True when PIL can open and verify the file as an image."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:
        return False


def split_readable(paths: list[str]) -> tuple[list[str], list[str]]:
    """Split image paths into (readable, unreadable), checking files in parallel."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        ok = list(pool.map(is_readable_image, paths))
    good = [p for p, fine in zip(paths, ok, strict=True) if fine]
    bad = [p for p, fine in zip(paths, ok, strict=True) if not fine]
    return good, bad


def decode_image(path: tf.Tensor, cfg: Config) -> tf.Tensor:
    """An image file's path -> uint8 (image_size, image_size, channels) tensor."""
    image = tf.io.decode_image(
        tf.io.read_file(path), channels=cfg.channels, expand_animations=False
    )
    return resize_image(image, cfg)


def files_pipeline(paths: list[str], labels: list[int], class_names: list[str], cfg: Config):
    """Image files + labels -> (train_ds, val_ds, info), leaving unreadable files out.

    Policy for corrupt or non-image files: skip them, report how many (and which) on
    the console and in the run's params, and stop only when a class is left empty.
    """
    readable, skipped = split_readable(paths)
    if skipped:
        shown = "\n  ".join(skipped[:5]) + ("\n  ..." if len(skipped) > 5 else "")
        print(f"warning: skipped {len(skipped)} unreadable image file(s):\n  {shown}")
        label_of = dict(zip(paths, labels, strict=True))
        paths, labels = readable, [label_of[p] for p in readable]
    _require_classes(labels, class_names)

    paths_arr, labels_arr = np.array(paths), np.array(labels, dtype=np.int32)
    train_idx, val_idx = _split_indices(len(paths), cfg)

    def pipeline(idx, training):
        ds = tf.data.Dataset.from_tensor_slices((paths_arr[idx], labels_arr[idx]))
        ds = ds.map(lambda path, label: (decode_image(path, cfg), label),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)  # fmt: skip
        # A file that passed the PIL check but still fails to decode is dropped, not fatal.
        ds = ds.ignore_errors()
        return _finish(ds, cfg, training, len(idx))

    info = DataInfo(_image_shape(cfg), class_names, len(train_idx), len(val_idx), skipped)
    return pipeline(train_idx, True), pipeline(val_idx, False), info


def _require_classes(labels, class_names: list[str]) -> None:
    present = set(int(v) for v in labels)
    empty = [name for i, name in enumerate(class_names) if i not in present]
    if empty:
        raise UserError(
            f"class(es) {', '.join(empty)} have no readable images. Add images to them "
            "or remove them; every class needs examples to train on."
        )
    if len(class_names) < 2:
        raise UserError(
            f"found only one class ({', '.join(class_names) or 'none'}); a classifier needs "
            "at least two. For imagedir data, put each class in its own sub-folder."
        )


def _require_path(path_text: str, what: str) -> Path:
    if not path_text:
        raise UserError(f"--data-dir is required for this data source: give {what}")
    path = Path(path_text).expanduser()
    if not path.exists():
        raise UserError(f"data path {path} does not exist: give {what} with --data-dir")
    return path


def load_imagedir(cfg: Config):
    """One sub-folder per class, images of any size, PNG/JPEG/BMP/GIF, gray or RGB."""
    root = _require_path(cfg.data_dir, "a folder with one sub-folder of images per class")
    if not root.is_dir():
        raise UserError(f"{root} is a file; imagedir needs a folder of class sub-folders")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = " (it holds images directly: move them into one sub-folder per class)"
        raise UserError(f"{root} has no class sub-folders{hint if loose else ''}")
    paths, labels, empty = [], [], []
    for index, class_dir in enumerate(class_dirs):
        files = sorted(str(p) for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            empty.append(class_dir.name)
        paths += files
        labels += [index] * len(files)
    if empty:
        raise UserError(
            f"class folder(s) {', '.join(empty)} in {root} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)"
        )
    return files_pipeline(paths, labels, [d.name for d in class_dirs], cfg)


def _label_index(values: list) -> tuple[list[int], list[str]]:
    """Raw label values (names or numbers) -> (indices, sorted class names)."""
    try:
        unique = sorted(set(values), key=float)
    except (TypeError, ValueError):
        unique = sorted(set(map(str, values)))
        values = list(map(str, values))
    lookup = {value: i for i, value in enumerate(unique)}
    return [lookup[v] for v in values], [str(v) for v in unique]


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


def load_dataframe(cfg: Config):
    """A CSV or JSON table (e.g. a saved query result) of image paths and labels.

    Relative paths are taken relative to the table's folder. JSON is a list of
    records: [{"path": "...", "label": "..."}, ...].
    """
    table = _require_path(cfg.data_dir, "a .csv or .json table of image paths and labels")
    rows = read_table(table)
    missing_cols = [c for c in (cfg.path_column, cfg.label_column) if c not in rows[0]]
    if missing_cols:
        raise UserError(
            f"{table} has no column(s) {', '.join(missing_cols)}; its columns are "
            f"{', '.join(rows[0])}. Set --path-column / --label-column."
        )
    paths = table_paths(table, [r[cfg.path_column] for r in rows])
    labels, class_names = _label_index([r[cfg.label_column] for r in rows])
    return files_pipeline(paths, labels, class_names, cfg)


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if path.suffix.lower() in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as data:
            return {k: data[k][()] for k in data if isinstance(data[k], h5py.Dataset)}
    raise UserError(f"{path}: the arrays source reads .npz, .h5 or .hdf5 files")


def load_arrays(cfg: Config):
    """Images and labels in one .npz or HDF5 file.

    Keys: `images` (N, H, W[, C]) with pixel values 0..255 (floats in 0..1 are
    scaled up), `labels` (N,) integers or one-hot (N, K), optional `class_names`.
    `x` / `y` are accepted for images / labels.
    """
    path = _require_path(cfg.data_dir, "a .npz or .h5 file with images and labels")
    data = _read_arrays(path)
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
    indices, names = _label_index(labels.astype(np.int64).tolist())
    if "class_names" in data and len(data["class_names"]) >= len(names):
        given = [str(n, "utf-8") if isinstance(n, bytes) else str(n) for n in data["class_names"]]
        names = [given[int(n)] for n in names]
    _require_classes(indices, names)
    labels_arr = np.array(indices, dtype=np.int32)
    train_idx, val_idx = _split_indices(len(images), cfg)

    def pipeline(idx, training):
        ds = tf.data.Dataset.from_tensor_slices((images[idx], labels_arr[idx]))
        ds = ds.map(lambda x, y: (resize_image(x, cfg), y), num_parallel_calls=tf.data.AUTOTUNE)
        return _finish(ds, cfg, training, len(idx))

    info = DataInfo(_image_shape(cfg), names, len(train_idx), len(val_idx))
    return pipeline(train_idx, True), pipeline(val_idx, False), info


def load_tfds(cfg: Config):
    """A TensorFlow Datasets dataset (default malaria), split from its train split by percent.

    The data must already be in data_dir (`make load_tfdata` downloads it): nothing
    is downloaded during training.
    """
    import tensorflow_datasets as tfds

    data_dir = cfg.data_dir or "/storage/tfdata"
    val_percent = max(1, round(cfg.val_split * 100))
    try:
        (train_raw, val_raw), ds_info = tfds.load(
            cfg.dataset,
            split=[f"train[:{100 - val_percent}%]", f"train[{100 - val_percent}%:]"],
            data_dir=data_dir,
            as_supervised=True,
            with_info=True,
            download=False,
        )
    except tfds.core.registered.DatasetNotFoundError as err:
        raise UserError(f"TFDS has no dataset named '{cfg.dataset}': {err}") from err
    except (AssertionError, FileNotFoundError) as err:
        raise UserError(
            f"TFDS dataset '{cfg.dataset}' is not in {data_dir}. Download it first with "
            f"`make load_tfdata DATASET={cfg.dataset} TFDS_DIR={data_dir}`, or point "
            "--data-dir at the folder that holds it."
        ) from err
    class_names = list(ds_info.features["label"].names)
    if len(class_names) < 2:
        raise UserError(f"TFDS dataset '{cfg.dataset}' has fewer than two classes")
    counts = [_cap(_count(train_raw), cfg.training_samples),
              _cap(_count(val_raw), cfg.validation_samples)]  # fmt: skip

    def pipeline(raw, count, training):
        raw = raw.take(count)
        ds = raw.map(
            lambda x, y: (resize_image(x, cfg), tf.cast(y, tf.int32)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return _finish(ds, cfg, training, count)

    info = DataInfo(_image_shape(cfg), class_names, counts[0], counts[1])
    return pipeline(train_raw, counts[0], True), pipeline(val_raw, counts[1], False), info


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


def load_demo(cfg: Config):
    """The offline synthetic dataset: made on first use (see make_demo_data), then imagedir."""
    directory = Path(cfg.data_dir or PROJECT_DIR / "data" / "demo")
    stamp = directory / "demo.json"
    recipe = {"samples": cfg.demo_samples, "image_size": 64, "seed": 0, "version": 1}
    if not stamp.exists() or json.loads(stamp.read_text()) != recipe:
        print(f"making {cfg.demo_samples} synthetic demo images in {directory} ...")
        for class_name in DEMO_CLASSES:
            for old in (directory / class_name).glob("*.png"):
                old.unlink()
        make_demo_data(directory, cfg.demo_samples, recipe["image_size"], recipe["seed"])
        stamp.write_text(json.dumps(recipe))
    return load_imagedir(dataclasses.replace(cfg, data_dir=str(directory)))


# The data sources by name; add yours here.
LOADERS = {
    "tfds": load_tfds,
    "imagedir": load_imagedir,
    "dataframe": load_dataframe,
    "arrays": load_arrays,
    "demo": load_demo,
}


# ----------------------------------------------------------------------------
# Network: define_network(input_shape, num_classes, cfg) -> keras.Model
# ----------------------------------------------------------------------------


def define_network(input_shape: tuple[int, int, int], num_classes: int, cfg: Config):
    """Build and compile the classifier.

    The model takes raw pixel values (0..255, float32) and rescales them itself, so
    whoever loads it from MLflow needs no preprocessing code of their own.

    Args:
        input_shape: (height, width, channels) of the images, from the data's info.
        num_classes: number of classes, from the data's info; 2 gives one sigmoid
            output (probability of class 1), more give a softmax.
        cfg: convolutions (0 = VGG16), weights, fine_tune_layers, dense_units,
            dropout, randomize_images, learning_rate, xla.

    Returns:
        A compiled keras.Model with accuracy, auc, precision and recall metrics.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if cfg.randomize_images:  # active only while training
        x = keras.layers.RandomFlip("horizontal_and_vertical", seed=cfg.seed)(x)
        x = keras.layers.RandomRotation(0.1, seed=cfg.seed)(x)
        x = keras.layers.RandomZoom(0.1, seed=cfg.seed)(x)
    if cfg.convolutions == 0:
        base = keras.applications.VGG16(
            include_top=False,
            weights=None if cfg.weights == "none" else cfg.weights,
            input_shape=input_shape,
        )
        base.trainable = False
        for layer in base.layers[len(base.layers) - cfg.fine_tune_layers :]:
            layer.trainable = cfg.fine_tune_layers > 0
        x = keras.applications.vgg16.preprocess_input(x)
        x = base(x)
    else:
        x = keras.layers.Rescaling(1.0 / 255)(x)
        for i in range(cfg.convolutions):
            x = keras.layers.Conv2D(min(32 * 2**i, 256), 3, padding="same", activation="relu")(x)
            if x.shape[1] >= 4:
                x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(cfg.dense_units, activation="relu")(x)
    x = keras.layers.Dropout(cfg.dropout)(x)
    binary = num_classes == 2
    # float32 output keeps the loss stable under mixed precision
    outputs = keras.layers.Dense(
        1 if binary else num_classes,
        activation="sigmoid" if binary else "softmax",
        dtype="float32",
        name="probabilities",
    )(x)
    model = keras.Model(inputs, outputs, name=network_name(cfg))
    model.compile(
        optimizer=keras.optimizers.Adam(cfg.learning_rate),
        loss="binary_crossentropy" if binary else "categorical_crossentropy",
        metrics=[
            keras.metrics.BinaryAccuracy(name="accuracy")
            if binary
            else keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc"),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
        jit_compile=cfg.xla,
    )
    return model


def network_name(cfg: Config) -> str:
    return "vgg16" if cfg.convolutions == 0 else f"cnn{cfg.convolutions}"


# ----------------------------------------------------------------------------
# Tracking: where runs go, and what each run logs
# ----------------------------------------------------------------------------


def local_tracking_uri() -> str:
    """The embedded default store: mlflow.db in this folder (what `mlflow ui` reads here)."""
    return f"sqlite:///{PROJECT_DIR / 'mlflow.db'}"


def configure_tracking(timeout: float = 5.0) -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI or the local store; fail fast if unreachable.

    Returns:
        The tracking URI in use.

    Raises:
        UserError: an http(s) tracking server gave no answer within `timeout` seconds.
    """
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri()
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)
        except urllib.error.HTTPError:
            pass  # it answered (an auth proxy may say 401): it is reachable
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise UserError(
                f"the MLflow tracking server at {uri} is unreachable ({reason}). Start it "
                "(for example `make server`), fix MLFLOW_TRACKING_URI, or unset it to log "
                "to the local store in this folder. Nothing was trained."
            ) from err
    return uri


def _set_experiment(name: str, uri: str) -> None:
    """Use experiment `name`, keeping a local store's artifacts next to its database."""
    import mlflow

    if os.environ.get("MLFLOW_RUN_ID"):
        return  # `mlflow run` already created the run in its experiment
    if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(name) is None:
        db_dir = Path(uri.removeprefix("sqlite:///")).parent
        mlflow.create_experiment(name, artifact_location=(db_dir / "mlruns").as_uri())
    mlflow.set_experiment(name)


class MlflowMetrics(keras.callbacks.Callback):
    """Log every epoch's train and validation metrics with step=epoch.

    When the tracking server does not answer, the epoch's metrics are kept and sent
    with the next epoch's, so a server restart mid-run loses nothing; the last try
    happens in flush() at the end of training.
    """

    def __init__(self):
        super().__init__()
        self.pending: list[tuple[int, dict[str, float]]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.pending.append((epoch, {k: float(v) for k, v in (logs or {}).items()}))
        self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        import mlflow

        while self.pending:
            epoch, metrics = self.pending[0]
            try:
                mlflow.log_metrics(metrics, step=epoch)
            except Exception as err:
                if final:
                    raise
                print(f"warning: could not log epoch {epoch} metrics ({err}); will retry")
                return
            self.pending.pop(0)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (training has no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def _plot_learning_curves(history: dict, path: Path) -> None:
    plt = _pyplot()
    names = [m for m in ("loss", "accuracy", "auc") if m in history]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        epochs = np.arange(1, len(history[name]) + 1)
        ax.plot(epochs, history[name], "o-", label="train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], "o-", label="validation")
        ax.set(title=name, xlabel="epoch")
        ax.legend()
    _save_figure(fig, path)


def plot_confusion_matrix(y_true, y_pred, class_names, path: Path) -> np.ndarray:
    plt = _pyplot()
    k = len(class_names)
    matrix = np.zeros((k, k), dtype=int)
    np.add.at(matrix, (y_true, y_pred), 1)
    fig, ax = plt.subplots(figsize=(1.2 * k + 3, 1.2 * k + 2.5))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=color)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title="validation confusion matrix")  # fmt: skip
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    _save_figure(fig, path)
    return matrix


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False and true positive rates over all thresholds, and the area under them."""
    order = np.argsort(-scores, kind="stable")
    hits = y_true[order] == 1
    tpr = np.concatenate([[0.0], np.cumsum(hits) / max(hits.sum(), 1)])
    fpr = np.concatenate([[0.0], np.cumsum(~hits) / max((~hits).sum(), 1)])
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def plot_roc(y_true, scores, path: Path) -> float:
    plt = _pyplot()
    fpr, tpr, area = roc_curve(y_true, scores)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC = {area:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="validation ROC")
    ax.legend(loc="lower right")
    _save_figure(fig, path)
    return area


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_id: str
    model_uri: str  # runs:/<run_id>/model
    model_version: str | None  # registered version, None when not registered
    metrics: dict[str, float]  # the last epoch's metrics
    tracking_uri: str


def choose_strategy(cfg: Config) -> tf.distribute.Strategy:
    """MirroredStrategy over all GPUs when there are several, else the default strategy."""
    gpus = tf.config.list_physical_devices("GPU")
    if cfg.distribute and len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def set_precision(cfg: Config) -> str:
    """Set Keras' global dtype policy: mixed_float16 on a GPU when asked, else float32."""
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    wanted = cfg.mixed_precision == "true" or (cfg.mixed_precision == "auto" and has_gpu)
    if wanted and not has_gpu:
        print("note: mixed precision needs a GPU; training in float32")
    policy = "mixed_float16" if wanted and has_gpu else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def _one_hot(ds: tf.data.Dataset, num_classes: int) -> tf.data.Dataset:
    if num_classes == 2:
        return ds.map(lambda x, y: (x, tf.cast(y, tf.float32)[..., tf.newaxis]))
    return ds.map(lambda x, y: (x, tf.one_hot(y, num_classes)))


def run_training(cfg: Config) -> TrainResult:
    """Check everything, train, evaluate and log one run; register its model.

    Problems with parameters, data or the tracking server raise UserError before
    a run is started. The model is registered only after training and evaluation
    succeed, so a failed run never gets a model version.
    """
    import mlflow

    cfg.validate()
    tracking_uri = configure_tracking()
    keras.utils.set_random_seed(cfg.seed)
    strategy = choose_strategy(cfg)
    replicas = strategy.num_replicas_in_sync
    policy = set_precision(cfg)

    print(f"loading data ({cfg.data_source}) ...")
    global_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * replicas)
    train_ds, val_ds, info = load_data(global_cfg)
    print(f"  {info.train_count} training / {info.val_count} validation images, "
          f"classes {info.class_names}, shape {info.image_shape}")  # fmt: skip

    _set_experiment(cfg.experiment_name, tracking_uri)
    run_name = cfg.run_name or f"{network_name(cfg)}-{cfg.data_source}"
    with mlflow.start_run(run_name=run_name) as run:
        print(f"logging to {tracking_uri}, run {run.info.run_id}")
        code = provenance.check_and_tag(run.info.run_id, PROJECT_DIR)  # stops a stale image
        mlflow.set_tags({
            "git_commit": code["commit"], "data_source": cfg.data_source,
            "network": network_name(cfg),
            # `lifecycle.py reap-runs` marks the run FAILED once this process is gone
            "process.host": socket.gethostname(), "process.pid": str(os.getpid()),
        })  # fmt: skip
        # `mlflow run` has logged its entry point's parameters already (shell-quoted, so
        # '' reads "''"); a parameter may not change, so add only the missing ones.
        logged = mlflow.get_run(run.info.run_id).data.params
        mlflow.log_params({k: v for k, v in dataclasses.asdict(cfg).items() if k not in logged})
        mlflow.log_params({
            "num_classes": info.num_classes, "class_names": ",".join(info.class_names),
            "train_count": info.train_count, "val_count": info.val_count,
            "skipped_files": len(info.skipped_files), "replicas": replicas,
            "global_batch_size": global_cfg.batch_size, "dtype_policy": policy,
        })  # fmt: skip

        print(f"building the network ({network_name(cfg)}) ...")
        with strategy.scope():
            model = define_network(info.image_shape, info.num_classes, cfg)
        lines: list[str] = []
        model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
        mlflow.log_text("\n".join(lines), "model_summary.txt")

        print(f"training for {cfg.epochs} epoch(s) ...")
        metrics_logger = MlflowMetrics()
        history = model.fit(
            _one_hot(train_ds, info.num_classes),
            validation_data=_one_hot(val_ds, info.num_classes),
            epochs=cfg.epochs,
            callbacks=[metrics_logger],
            shuffle=False,  # train_ds reshuffles itself every epoch
            verbose="auto" if sys.stdout.isatty() else 2,
        )
        metrics_logger.flush()

        print("evaluating and logging plots and the model ...")
        result_metrics = {k: float(v[-1]) for k, v in history.history.items()}
        _log_evaluation(model, val_ds, info, history.history)
        model_version = _log_model(model, val_ds, info, cfg)

    return TrainResult(
        run_id=run.info.run_id,
        model_uri=f"runs:/{run.info.run_id}/model",
        model_version=model_version,
        metrics=result_metrics,
        tracking_uri=tracking_uri,
    )


def _log_evaluation(model, val_ds, info: DataInfo, history: dict) -> None:
    import mlflow

    labels = np.concatenate([y.numpy() for _, y in val_ds])
    probabilities = model.predict(val_ds, verbose=0)
    if info.num_classes == 2:
        predicted = (probabilities[:, 0] >= 0.5).astype(int)
    else:
        predicted = probabilities.argmax(axis=1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _plot_learning_curves(history, out / "learning_curves.png")
        plot_confusion_matrix(labels, predicted, info.class_names, out / "confusion_matrix.png")
        if info.num_classes == 2:
            plot_roc(labels, probabilities[:, 0], out / "roc_curve.png")
        mlflow.log_artifacts(tmp, "plots")


def export_tf_serving(model, directory: str | Path, version: int = 1) -> Path:
    """Write a Keras model as a TF Serving SavedModel in directory/version.

    TF Serving loads numbered version folders under a model's base path and serves
    the `serving_default` signature; Keras 3's export writes it. The model takes raw
    pixels 0..255 (float32, shape (None, H, W, C)) as in MLflow.

    Returns:
        The version folder written.
    """
    target = Path(directory) / str(version)
    if target.exists():
        raise UserError(f"{target} exists; TF Serving versions are immutable, pick --version")
    target.parent.mkdir(parents=True, exist_ok=True)
    model.export(str(target), format="tf_saved_model", verbose=False)
    return target


def _log_model(model, val_ds, info: DataInfo, cfg: Config) -> str | None:
    """Log the model (with signature and input example), register it, give it an alias."""
    import mlflow
    from mlflow.models import infer_signature

    example = next(iter(val_ds))[0].numpy()[:1]
    signature = infer_signature(example, model.predict(example, verbose=0))
    metadata = {
        "class_names": info.class_names,
        "image_size": info.image_shape[0],
        "channels": info.image_shape[2],
    }
    model_info = mlflow.tensorflow.log_model(
        model,
        name="model",
        signature=signature,
        input_example=example,
        metadata=metadata,
        registered_model_name=cfg.registered_model_name or None,
    )
    if cfg.export_savedmodel:
        with tempfile.TemporaryDirectory() as tmp:
            export_tf_serving(model, tmp)
            mlflow.log_artifacts(tmp, "tf_serving")
    version = model_info.registered_model_version
    if version is not None and cfg.model_alias:
        mlflow.MlflowClient().set_registered_model_alias(
            cfg.registered_model_name, cfg.model_alias, str(version)
        )
    return None if version is None else str(version)


# ----------------------------------------------------------------------------
# Command line: flags generated from Config
# ----------------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    """true/false, yes/no, 1/0 (any case) -> bool; anything else is an error."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, yes/no or 1/0, got '{text}'")


_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": parse_bool}


def field_type(f: dataclasses.Field) -> str:
    """A Config field's type name: int, float, str or bool."""
    return f.type if isinstance(f.type, str) else f.type.__name__


def add_config_flags(parser: argparse.ArgumentParser, names: Collection[str] | None = None):
    """Add a typed flag for each Config field (or those in `names`), with its help and default."""
    for f in fields(Config):
        if names is not None and f.name not in names:
            continue
        kind = field_type(f)
        # --data-source, and --data_source: the spelling `mlflow run -P` uses for extras
        spellings = dict.fromkeys(["--" + f.name.replace("_", "-"), "--" + f.name])
        parser.add_argument(
            *spellings,
            dest=f.name,
            type=_FIELD_TYPES[kind],
            default=f.default,
            metavar=kind.upper(),
            help=f.metadata["help"],
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_flags(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    return Config(**vars(build_parser().parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    # The pipelines drop undecodable files, so their length is unknown until a first
    # pass ends, and Keras then warns that the input "ran out of data". Harmless.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    # SIGTERM (docker stop, kill, a job scheduler) unwinds like an exception, so
    # `with mlflow.start_run()` marks the run FAILED instead of leaving it RUNNING.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.time()
    try:
        result = run_training(cfg)
    except (UserError, provenance.ProvenanceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"\ndone in {time.time() - started:.0f} s")
    print(f"run_id: {result.run_id}")
    if result.model_version:
        print(f"registered model: {cfg.registered_model_name} version {result.model_version}"
              + (f" (alias {cfg.model_alias})" if cfg.model_alias else ""))  # fmt: skip
    if "val_accuracy" in result.metrics:
        print(f"val_accuracy: {result.metrics['val_accuracy']:.4f}")
    if result.tracking_uri.startswith("sqlite:"):
        print(f"see it: make ui, or mlflow ui --backend-store-uri {result.tracking_uri} "
              "--port 5000, then open http://127.0.0.1:5000")  # fmt: skip
    else:
        print(f"see it: {result.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
