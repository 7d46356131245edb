"""The data sources whose images arrive as arrays, not files: a .npz or HDF5 file of
images and labels (arrays), and a TensorFlow Datasets dataset on disk (tfds).

arrays ends in engine.images.arrays_pipeline; tfds resizes each split through the
shared decoded-image cache, held in memory or streamed from it (engine.pipelines).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import tensorflow as tf

from engine import cache as image_cache
from engine.config import RunConfig, UserError
from engine.decoding import aligned_zeros, resize_image
from engine.file_sources import Pipelines, require_path
from engine.images import (
    DataInfo,
    _cap,
    arrays_pipeline,
    image_shape,
    label_index,
    load_source,
    plan_images,
    text_digest,
)

DEFAULT_TFDS_DIR = "/storage/tfdata"


# ----------------------------------------------------------------------------
# arrays: images and labels in one .npz or HDF5 file
# ----------------------------------------------------------------------------


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array in a .npz or HDF5 file, by name."""
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if path.suffix.lower() in (".h5", ".hdf5"):
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
        print(
            f"note: {path} holds channels-first images {images.shape}; reading them as (N, H, W, C)"
        )
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
    builder, split_names, raws = _open_tfds(name, data_dir or DEFAULT_TFDS_DIR, cfg)
    class_names = list(builder.info.features["label"].names)
    if len(class_names) < 2:
        raise UserError(f"TFDS dataset '{name}' has fewer than two classes")
    caps = (cfg.training_samples, cfg.validation_samples, 0)  # the test split is never capped
    counts = [_cap(_count(raw), cap) for raw, cap in zip(raws, caps, strict=False)]
    version = builder.info.version
    plan = plan_images(cfg, sum(counts))  # one choice for all the splits together
    # The cache knows an example by dataset, version, split (with its slice) and index.
    parts = [
        load_source(
            [f"tfds:{name}:{version}:{split}:{i}" for i in range(count)],
            SplitDecoder(raw, image_shape(cfg)),
            cfg,
            plan,
        )
        for raw, split, count in zip(raws, split_names, counts, strict=False)
    ]
    pipelines = [
        part.pipeline(np.arange(count), part.labels.astype(np.int32), cfg, training=(i == 0))
        for i, (part, count) in enumerate(zip(parts, counts, strict=True))
    ]
    per_class = {
        split: np.bincount(part.labels, minlength=len(class_names)).tolist()
        for split, part in zip(("train", "val", "test"), parts, strict=False)
    }
    lineage = {
        "name": f"tfds:{name}:{version}",
        "source": str(builder.data_dir),
        "digest": text_digest([f"{name}:{version}:{'|'.join(split_names)}"]),
    }
    has_test = len(parts) == 3 and counts[2] > 0
    info = DataInfo(
        image_shape=image_shape(cfg),
        class_names=class_names,
        train_count=counts[0],
        val_count=counts[1],
        skipped_files=[],
        source=f"tfds:{name}",
        test_count=counts[2] if has_test else 0,
        class_counts=per_class,
        test_ds=pipelines[2] if has_test else None,
        lineage=lineage,
        pipeline_params=plan.params(),
    )
    return pipelines[0], pipelines[1], info


def _open_tfds(name: str, data_dir: str, cfg: RunConfig) -> tuple[Any, list[str], list]:
    """(the dataset's builder, its split names, one tf.data.Dataset per split)."""
    # tensorflow_datasets takes seconds to import, and only this source needs it
    import tensorflow_datasets as tfds

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
    return builder, split_names, raws


class SplitDecoder:
    """The cache's decode function for a TFDS split: indices of its examples -> resized.

    The cache asks for pieces in ascending order, so one pass over the split serves
    them all, a batch of it in memory at a time (a new pass starts if indices go back).
    """

    def __init__(self, raw: tf.data.Dataset, shape: tuple[int, int, int]):
        self.raw, self.shape = raw, shape
        self._restart()

    def _restart(self) -> None:
        size, channels = self.shape[0], self.shape[2]
        resized = self.raw.map(
            lambda x, y: (resize_image(x, size, channels), y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        self.batches = resized.batch(256).prefetch(1).as_numpy_iterator()
        self.start = 0  # the example index of self.images[0]
        self.images, self.labels = np.empty((0, *self.shape), np.uint8), np.empty(0, np.int64)

    def __call__(self, indices: list[int]) -> image_cache.Decoded:
        if indices and indices[0] < self.start:
            self._restart()
        images = aligned_zeros((len(indices), *self.shape))
        labels = np.empty(len(indices), np.int64)
        for j, index in enumerate(indices):
            while index >= self.start + len(self.images):
                self.start += len(self.images)
                self.images, self.labels = next(self.batches)
            images[j], labels[j] = self.images[index - self.start], self.labels[index - self.start]
        return image_cache.Decoded(images, labels)


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
    # tensorflow_datasets takes seconds to import, and only this source needs it
    import tensorflow_datasets as tfds

    try:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(
            f"error: cannot create {data_dir} ({err}). Create it with write access for "
            "this user, or choose another folder with TFDS_DIR=...",
            file=sys.stderr,
        )
        return 1
    try:
        tfds.builder(name, data_dir=data_dir).download_and_prepare()
    except Exception as err:
        print(
            f"error: could not download TFDS dataset '{name}' into {data_dir}: {err}\n"
            "Check the network connection (this needs internet access) and the name.",
            file=sys.stderr,
        )
        return 1
    print(f"{name} is ready in {data_dir}")
    return 0
