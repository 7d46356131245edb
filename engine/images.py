"""Images into tf.data pipelines: decode, resize, split, cache, shuffle, batch.

Every data source ends in `files_pipeline` (image files) or `arrays_pipeline`
(images in memory), so all of them yield the same thing: batched
(float32 pixels 0..255 of shape (image_size, image_size, channels), int32 labels).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from engine.config import RunConfig, UserError

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


def resize_image(image: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
    """Any image tensor (H, W[, C]) -> uint8 (image_size, image_size, channels)."""
    if image.shape.rank == 2:
        image = image[..., tf.newaxis]
    have = image.shape[-1]
    if have == 4:
        image = image[..., :3]
        have = 3
    if have == 1 and channels == 3:
        image = tf.image.grayscale_to_rgb(image)
    elif have == 3 and channels == 1:
        image = tf.image.rgb_to_grayscale(image)
    image = tf.image.resize(image, (image_size, image_size))  # bilinear, as Keras loaders
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def decode_image(path: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
    """An image file's path -> uint8 (image_size, image_size, channels) tensor."""
    image = tf.io.decode_image(tf.io.read_file(path), channels=channels, expand_animations=False)
    return resize_image(image, image_size, channels)


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


def report_skipped(skipped: list[str], what: str = "unreadable image file(s)") -> None:
    """Print how many files were left out, and the first few of them."""
    if skipped:
        shown = "\n  ".join(skipped[:5]) + ("\n  ..." if len(skipped) > 5 else "")
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
    """uint8 images -> cached (a quarter of float32's memory), shuffled, batched float32."""
    if cfg.cache:
        ds = ds.cache()
    if training:
        ds = ds.shuffle(min(max(count, 1), 10_000), seed=cfg.seed, reshuffle_each_iteration=True)
    ds = ds.batch(cfg.batch_size)
    ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def files_pipeline(
    paths: list[str], labels: list[int], class_names: list[str], cfg: RunConfig, source: str = ""
) -> tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]:
    """Image files and their label indices -> (train_ds, val_ds, info).

    Corrupt or non-image files are skipped and reported (on the console, and in the
    run's `skipped_files` param); the run stops only when a class is left empty.
    """
    readable, skipped = split_readable(paths)
    if skipped:
        report_skipped(skipped)
        label_of = dict(zip(paths, labels, strict=True))
        paths, labels = readable, [label_of[p] for p in readable]
    require_classes(labels, class_names)

    paths_arr, labels_arr = np.array(paths), np.array(labels, dtype=np.int32)
    train_idx, val_idx = split_indices(len(paths), cfg)

    def pipeline(idx: np.ndarray, training: bool) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((paths_arr[idx], labels_arr[idx]))
        ds = ds.map(
            lambda path, label: (decode_image(path, cfg.image_size, cfg.channels), label),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        # A file that passed the PIL check but still fails to decode is dropped, not fatal.
        ds = ds.ignore_errors()
        return finish(ds, cfg, training, len(idx))

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
    """Images in memory (N, H, W, C), pixel values 0..255, and label indices -> pipelines."""
    labels_arr = np.asarray(labels, dtype=np.int32)
    require_classes(labels_arr, class_names)
    train_idx, val_idx = split_indices(len(images), cfg)

    def pipeline(idx: np.ndarray, training: bool) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((images[idx], labels_arr[idx]))
        ds = ds.map(
            lambda x, y: (resize_image(x, cfg.image_size, cfg.channels), y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return finish(ds, cfg, training, len(idx))

    info = DataInfo(image_shape(cfg), list(class_names), len(train_idx), len(val_idx), [], source)
    return pipeline(train_idx, True), pipeline(val_idx, False), info
