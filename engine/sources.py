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
from engine.common import IMAGE_EXTENSIONS, image_files
from engine.config import RunConfig, UserError
from engine.decoding import resize_image
from engine.images import (
    SPLIT_ALIASES,
    DataInfo,
    _cap,
    arrays_pipeline,
    files_pipeline,
    image_shape,
    label_index,
    memory_pipeline,
    text_digest,
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


def load_imagedir(folder: str, cfg: RunConfig) -> Pipelines:
    """One sub-folder per class, images of any size, PNG/JPEG/BMP/GIF/WebP, gray or RGB."""
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
    folder = os.path.abspath(table.parent)  # abspath, not resolve(): no syscall per row
    paths = [os.path.normpath(os.path.join(folder, str(value))) for value in values]
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


def load_dataframe(
    table_text: str, cfg: RunConfig, path_column: str, label_column: str, split_column: str = ""
):
    """A CSV or JSON table (e.g. a saved query result) of image paths and labels.

    Relative paths are taken relative to the table's folder. JSON is a list of
    records, [{"path": "...", "label": "..."}, ...], or {column: [values]}. When the
    table has a column named split_column (train, val/validation or test per row),
    its split is used instead of drawing one.
    """
    table = require_path(table_text, "a .csv or .json table of image paths and labels")
    rows = read_table(table)
    raw_paths = table_column(table, rows, path_column, "--path-column")
    raw_labels = table_column(table, rows, label_column, "--label-column")
    missing = [i + 2 for i, value in enumerate(raw_labels) if str(value or "").strip() == ""]
    if missing:
        raise UserError(
            f"{table}: {len(missing)} row(s) have no label in column '{label_column}' (e.g. "
            f"line {missing[0]}). Fill in their labels or remove those rows."
        )
    paths = table_paths(table, raw_paths)
    labels, class_names = label_index(raw_labels)
    splits = None
    if split_column and split_column in rows[0]:
        splits = table_splits(table, [row[split_column] for row in rows], split_column)
    return files_pipeline(paths, labels, class_names, cfg, "dataframe", splits)


def table_splits(table: Path, values: list, column: str) -> list[str]:
    """A split column's values as train / val / test; UserError on any other value."""
    splits = [SPLIT_ALIASES.get(str(v).strip().lower(), "") for v in values]
    bad = sorted({str(v) for v, split in zip(values, splits, strict=True) if not split})
    if bad:
        raise UserError(
            f"{table}: column '{column}' holds {', '.join(map(repr, bad[:5]))}; each row's "
            f"split must be one of {', '.join(sorted(SPLIT_ALIASES))}. Fix those rows, or "
            "rename the column to let the run draw its own split."
        )
    return splits


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
    images = channels_last(images, path)
    if images.dtype.kind not in "uif" or (
        images.dtype.kind == "f" and not np.isfinite(images).all()
    ):
        raise UserError(
            f"{path}: images must be numbers (uint8 0..255 or floats), got {images.dtype} "
            "or NaN/infinite values; save the pixel arrays themselves"
        )
    if images.dtype.kind == "f" and images.max() <= 1.0:
        images = images * 255.0
    elif images.dtype.itemsize > 1 and images.max() > 255:  # 16-bit images: scale to 0..255
        images = images.astype(np.float32) * (255.0 / float(np.iinfo(images.dtype).max))
    if images.ndim == 3:
        images = images[..., np.newaxis]
    indices, names = label_index(array_labels(labels, path))
    if (
        "class_names" in data
        and labels.dtype.kind in "iu"
        and len(data["class_names"]) >= len(names)
    ):
        given = [str(n, "utf-8") if isinstance(n, bytes) else str(n) for n in data["class_names"]]
        names = [given[int(n)] for n in names]
    train_ds, val_ds, info = arrays_pipeline(images, np.array(indices), names, cfg, "arrays")
    info.lineage["source"] = str(path.resolve())
    return train_ds, val_ds, info


def channels_last(images: np.ndarray, path: Path) -> np.ndarray:
    """(N, C, H, W) arrays (PyTorch's layout) -> (N, H, W, C), with a note."""
    if images.ndim == 4 and images.shape[1] in (1, 3, 4) and images.shape[3] not in (1, 3, 4):
        print(f"note: {path} holds channels-first images {images.shape}; "
              "reading them as (N, H, W, C)")  # fmt: skip
        return np.transpose(images, (0, 2, 3, 1))
    if images.ndim == 4 and images.shape[3] not in (1, 3, 4):
        raise UserError(
            f"{path}: images of shape {images.shape} have {images.shape[3]} channels; "
            "expected (N, H, W, C) or (N, C, H, W) with 1, 3 or 4 channels"
        )
    return images


def array_labels(labels: np.ndarray, path: Path) -> list:
    """Label values from an arrays file: integers, or text (class names); none missing."""
    if labels.dtype.kind in "SUO":
        text = [v.decode("utf-8") if isinstance(v, bytes) else v for v in labels.tolist()]
        empty = [i for i, v in enumerate(text) if v is None or str(v).strip() == ""]
        if empty:
            raise UserError(
                f"{path}: {len(empty)} label(s) are empty (e.g. index {empty[0]}); give every "
                "image a label"
            )
        return [str(v) for v in text]
    if labels.dtype.kind == "f":
        if not np.isfinite(labels).all():
            raise UserError(
                f"{path}: some labels are NaN (missing); give every image a label or drop "
                "those images"
            )
        if not np.equal(np.mod(labels, 1), 0).all():
            raise UserError(f"{path}: labels must be whole class indices or names, got fractions")
    if labels.dtype.kind not in "iufb":
        raise UserError(f"{path}: labels of type {labels.dtype} are not class indices or names")
    return labels.astype(np.int64).tolist()


# ----------------------------------------------------------------------------
# tfds: a TensorFlow Datasets dataset already on disk
# ----------------------------------------------------------------------------


def load_tfds(name: str, data_dir: str, cfg: RunConfig) -> Pipelines:
    """A TensorFlow Datasets dataset (e.g. malaria) already on disk.

    The dataset's own `validation` and `test` splits are used where it has them;
    the rest are cut from its `train` split by percent (val_split, test_split). The
    data must already be in data_dir (`make load_tfdata` downloads it): nothing is
    downloaded during training. Resized images go through the shared decoded-image
    cache like image files do.
    """
    import tensorflow_datasets as tfds

    data_dir = data_dir or DEFAULT_TFDS_DIR
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        split_names = tfds_splits(set(builder.info.splits), cfg)
        raws = builder.as_dataset(split=split_names, as_supervised=True)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise UserError(f"TFDS has no dataset named '{name}': {err}") from err
    except (AssertionError, FileNotFoundError) as err:
        raise UserError(
            f"TFDS dataset '{name}' is not in {data_dir}. Download it first with "
            f"`make load_tfdata DATASET={name} TFDS_DIR={data_dir}`, or point "
            "--data-dir at the folder that holds it."
        ) from err
    class_names = list(builder.info.features["label"].names)
    if len(class_names) < 2:
        raise UserError(f"TFDS dataset '{name}' has fewer than two classes")
    caps = (cfg.training_samples, cfg.validation_samples, 0)
    counts = [_cap(_count(raw), cap) for raw, cap in zip(raws, caps)]  # noqa: B905
    shape = image_shape(cfg)
    version = builder.info.version

    def cached(raw: tf.data.Dataset, split: str, count: int) -> image_cache.Decoded:
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
        keys = [f"tfds:{name}:{version}:{split}:{i}" for i in range(count)]
        return image_cache.load_images(keys, decode, cfg.cache, cfg.cache_dir, shape)

    parts = [cached(raw, split, count) for raw, split, count in zip(raws, split_names, counts)]  # noqa: B905
    pipelines = [
        memory_pipeline(part.images, part.labels, cfg, training=(i == 0))
        for i, part in enumerate(parts)
    ]
    per_class = {
        split: np.bincount(part.labels, minlength=len(class_names)).tolist()
        for split, part in zip(("train", "val", "test"), parts)  # noqa: B905
    }
    lineage = {"name": f"tfds:{name}:{version}", "source": str(builder.data_dir),
               "digest": text_digest([f"{name}:{version}:{'|'.join(split_names)}"])}  # fmt: skip
    has_test = len(parts) == 3 and counts[2] > 0
    info = DataInfo(
        shape, class_names, counts[0], counts[1], [], f"tfds:{name}",
        test_count=counts[2] if has_test else 0, class_counts=per_class,
        test_ds=pipelines[2] if has_test else None, lineage=lineage,
    )  # fmt: skip
    return pipelines[0], pipelines[1], info


def tfds_splits(available: set[str], cfg: RunConfig) -> list[str]:
    """TFDS split strings for (train, val[, test]): the dataset's own, else cut from train."""
    val_pct = 0 if "validation" in available else max(1, round(cfg.val_split * 100))
    test_pct = 0 if "test" in available else round(cfg.test_split * 100)
    train_end = 100 - val_pct - test_pct
    splits = [f"train[:{train_end}%]"]
    splits.append(
        "validation" if "validation" in available else f"train[{train_end}%:{100 - test_pct}%]"
    )
    if "test" in available and cfg.test_split > 0:
        splits.append("test")
    elif test_pct:
        splits.append(f"train[{100 - test_pct}%:]")
    return splits


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
    return (
        train_ds,
        val_ds,
        dataclasses.replace(info, source="demo", lineage={**info.lineage, "name": "demo"}),
    )
