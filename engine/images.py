"""Images into tf.data pipelines: decode, resize, split, cache, shuffle, batch.

Every data source ends in `files_pipeline` (image files) or `arrays_pipeline`
(images in memory), so all of them yield the same thing: batched
(uint8 pixels 0..255 of shape (image_size, image_size, channels), int32 labels).
The model casts them to float on the device: a quarter of float32's bytes cross.
Decoding (engine.decoding) is also the check that a file is an image, and decoded
images go through the shared disk cache (engine.cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from engine import cache as image_cache
from engine.config import RunConfig, UserError

# decode_image and resize_image stay importable from here, where forks found them
from engine.decoding import decode_files, decode_image, resize_image, resize_images  # noqa: F401

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclass
class DataInfo:
    """What the network and the logs need to know about the data.

    load_data returns one beside its two pipelines.
    """

    image_shape: tuple[int, int, int]  # (height, width, channels) after resizing
    class_names: list[str]
    train_count: int
    val_count: int
    skipped_files: list[str] = field(default_factory=list)  # unreadable images left out
    source: str = ""  # a short name of where the data came from, for run names and tags

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def image_shape(cfg: RunConfig) -> tuple[int, int, int]:
    return (cfg.image_size, cfg.image_size, cfg.channels)


def _cap(count: int, limit: int) -> int:
    return min(count, limit) if limit else count


def report_skipped(
    skipped: list[str],
    what: str = "unreadable image file(s)",
    reasons: dict[str, str] | None = None,
) -> None:
    """Print how many files were left out, and the first few of them with the reason."""
    if skipped:
        lines = [f"{p}: {reasons[p]}" if reasons and p in reasons else p for p in skipped[:5]]
        shown = "\n  ".join(lines) + ("\n  ..." if len(skipped) > 5 else "")
        print(f"warning: skipped {len(skipped)} {what}:\n  {shown}")


def label_index(values: list) -> tuple[list[int], list[str]]:
    """Raw label values (names or numbers) -> (indices, sorted class names)."""
    try:
        unique = sorted(set(values), key=float)
    except (TypeError, ValueError):
        unique = sorted(set(map(str, values)))
        values = list(map(str, values))
    lookup = {value: i for i, value in enumerate(unique)}
    return [lookup[v] for v in values], [str(v) for v in unique]


def require_classes(labels, class_names: list[str]) -> None:
    """Raise UserError unless there are two or more classes, each with examples."""
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


def split_indices(count: int, cfg: RunConfig) -> tuple[np.ndarray, np.ndarray]:
    """A seeded shuffle split into (train, val) index arrays, each non-empty and capped."""
    order = np.random.default_rng(cfg.seed).permutation(count)
    val_count = min(max(1, round(count * cfg.val_split)), count - 1)
    val, train = order[:val_count], order[val_count:]
    return (
        train[: _cap(len(train), cfg.training_samples)],
        val[: _cap(len(val), cfg.validation_samples)],
    )


def finish(ds: tf.data.Dataset, cfg: RunConfig, training: bool, count: int) -> tf.data.Dataset:
    """Unbatched (uint8 image, label) pairs -> cached in memory, shuffled, batched, prefetched."""
    if cfg.cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(max(count, 1), 10_000), seed=cfg.seed, reshuffle_each_iteration=True)
    return ds.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)


def memory_pipeline(
    images: np.ndarray, labels: np.ndarray, cfg: RunConfig, training: bool
) -> tf.data.Dataset:
    """Decoded uint8 images in memory and their labels -> batched, prefetched pipeline.

    The images are in memory already, so nothing is cached again; the training one
    is reshuffled every epoch.
    """
    ds = tf.data.Dataset.from_tensor_slices((images, np.asarray(labels, np.int32)))
    if training:
        buffer = min(max(len(images), 1), 10_000)
        ds = ds.shuffle(buffer, seed=cfg.seed, reshuffle_each_iteration=True)
    return ds.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)


def decode_cached(paths: list[str], cfg: RunConfig) -> image_cache.Decoded:
    """Image files -> decoded images, read from the shared cache or decoded and stored."""
    shape = image_shape(cfg)

    def decode(indices: list[int]) -> image_cache.Decoded:
        images, failures = decode_files([paths[i] for i in indices], shape[0], shape[2])
        return image_cache.Decoded(images, -np.ones(len(indices), np.int64), failures)

    keys = [image_cache.file_key(p) for p in paths]
    return image_cache.load_images(keys, decode, cfg.cache, cfg.cache_dir, shape)


def files_pipeline(
    paths: list[str], labels: list[int], class_names: list[str], cfg: RunConfig, source: str = ""
) -> tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]:
    """Image files and their label indices -> (train_ds, val_ds, info).

    Every file is decoded once, in parallel, or read from the shared cache. Corrupt or
    non-image files are skipped and reported with the reason (on the console, and in
    the run's `skipped_files` param); the run stops only when a class is left empty.
    """
    decoded = decode_cached(paths, cfg)
    skipped = [paths[i] for i in sorted(decoded.failures)]
    if skipped:
        report_skipped(skipped, reasons={paths[i]: why for i, why in decoded.failures.items()})
    readable = np.flatnonzero(decoded.ok())
    labels_arr = np.array(labels, dtype=np.int32)[readable]
    require_classes(labels_arr, class_names)
    train_idx, val_idx = split_indices(len(readable), cfg)

    def pipeline(idx: np.ndarray, training: bool) -> tf.data.Dataset:
        # one copy out of the decoded images: the readable ones of this split
        return memory_pipeline(decoded.images[readable[idx]], labels_arr[idx], cfg, training)

    info = DataInfo(
        image_shape(cfg), list(class_names), len(train_idx), len(val_idx), skipped, source
    )
    return pipeline(train_idx, True), pipeline(val_idx, False), info


def arrays_pipeline(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    cfg: RunConfig,
    source: str = "",
) -> tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]:
    """Images in memory (N, H, W, C), pixel values 0..255, and label indices -> pipelines.

    They are resized once, up front, to uint8; being in memory already, they skip the
    disk cache.
    """
    labels_arr = np.asarray(labels, dtype=np.int32)
    require_classes(labels_arr, class_names)
    train_idx, val_idx = split_indices(len(images), cfg)
    used = np.concatenate([train_idx, val_idx])  # resize only what the caps keep
    resized = resize_images(np.asarray(images)[used], cfg.image_size, cfg.channels)
    train_images, val_images = resized[: len(train_idx)], resized[len(train_idx) :]

    info = DataInfo(image_shape(cfg), list(class_names), len(train_idx), len(val_idx), [], source)
    return (
        memory_pipeline(train_images, labels_arr[train_idx], cfg, training=True),
        memory_pipeline(val_images, labels_arr[val_idx], cfg, training=False),
        info,
    )
