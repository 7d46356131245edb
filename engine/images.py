"""Images into tf.data pipelines: decode, resize, split, cache, shuffle, batch.

Every data source ends in `files_pipeline` (image files) or `arrays_pipeline`
(images in memory), so all of them yield the same thing: batched
(uint8 pixels 0..255 of shape (image_size, image_size, channels), int32 labels).
The model casts them to float on the device: a quarter of float32's bytes cross.
Decoding (engine.decoding) is also the check that a file is an image, and decoded
images go through the shared disk cache (engine.cache). A data set that fits
--memory-budget is held in memory; a larger one is streamed from the cache's shards
(engine.pipelines, engine.stream), with the same splits either way.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from engine import cache as image_cache
from engine.common import IMAGE_EXTENSIONS, text_digest  # noqa: F401 (re-exported)
from engine.config import RunConfig, UserError
from engine.datacheck import DataCheck, split_checked

# decode_image, resize_image and memory_pipeline stay importable from here, where forks
# found them
from engine.decoding import decode_files, decode_image, resize_image, resize_images  # noqa: F401
from engine.pipelines import (  # noqa: F401
    FileDecoder,
    Source,
    as_tensor,
    load_source,
    memory_pipeline,
    plan_images,
)
from engine.splits import (  # noqa: F401 (split_indices, SPLITS... were found here)
    SPLIT_ALIASES,
    SPLITS,
    _cap,
    class_counts,
    split_indices,
    split_names,
)


@dataclass
class DataInfo:
    """What the network and the logs need to know about the data.

    load_data returns one beside its two pipelines; the test split, when the source
    has one, travels in it (`test_ds`), so a load_data that makes none still works.
    """

    image_shape: tuple[int, int, int]  # (height, width, channels) after resizing
    class_names: list[str]
    train_count: int
    val_count: int
    skipped_files: list[str] = field(default_factory=list)  # unreadable images left out
    source: str = ""  # a short name of where the data came from, for run names and tags
    test_count: int = 0
    # images per class in each split: {"train": [n0, n1, ...], "val": [...], "test": [...]}
    class_counts: dict[str, list[int]] = field(default_factory=dict)
    # the test split: batched like val_ds, evaluated once at the end of a run; None: no test
    test_ds: tf.data.Dataset | None = field(default=None, repr=False, compare=False)
    # what the run saw, for its MLflow dataset input: a table (path, label, split) for
    # image files, or a name and a digest; see engine.tracking.log_dataset
    lineage: dict = field(default_factory=dict, repr=False, compare=False)
    # how the run holds its images, for its params: data_pipeline (memory or stream),
    # memory_budget_bytes, decoded_bytes (engine.memory.Plan); empty for a fork's own
    pipeline_params: dict = field(default_factory=dict, compare=False)
    # the data check's findings (engine.datacheck); None: --data-check off, or a fork's
    # own pipelines
    data_check: DataCheck | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def image_shape(cfg: RunConfig) -> tuple[int, int, int]:
    return (cfg.image_size, cfg.image_size, cfg.channels)


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


def files_pipeline(
    paths: list[str],
    labels: list[int],
    class_names: list[str],
    cfg: RunConfig,
    source: str = "",
    splits: list[str] | None = None,
    groups: list | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]:
    """Image files and their label indices -> (train_ds, val_ds, info).

    Every file is decoded once, in parallel, or read from the shared cache. Corrupt or
    non-image files are skipped and reported with the reason (on the console, and in
    the run's `skipped_files` param); the run stops only when a class is left empty.
    `splits` gives each file's split where the source names one (see split_indices);
    otherwise train, val and test are drawn by cfg.val_split and cfg.test_split,
    keeping each file's group (`groups`, e.g. a patient id) and its near duplicates
    (engine.datacheck) in one split. The test split is info.test_ds.
    """
    keys = [image_cache.file_key(p) for p in paths]  # path, size, mtime: stat once
    held = load_source(keys, FileDecoder(paths, cfg), cfg)
    skipped = [paths[i] for i in sorted(held.failures)]
    readable = np.flatnonzero(held.ok())
    labels_arr = np.array(labels, dtype=np.int32)[readable]
    kept_splits = None if splits is None else [splits[i] for i in readable]
    kept_keys, kept_paths = [keys[i] for i in readable], [paths[i] for i in readable]
    try:
        require_classes(labels_arr, class_names)
        parts, check = split_checked(
            kept_keys,
            kept_paths,
            labels_arr,
            class_names,
            cfg,
            lambda at: held.read(readable[at], image_shape(cfg)),
            kept_splits,
            None if groups is None else [groups[i] for i in readable],
        )
    finally:  # after the check's line, so a warm run's report reads as a cold one's
        if skipped:
            report_skipped(skipped, reasons={paths[i]: why for i, why in held.failures.items()})
    all_labels = np.zeros(len(paths), np.int32)
    all_labels[readable] = labels_arr

    def pipeline(idx: np.ndarray, training: bool) -> tf.data.Dataset:
        return held.pipeline(readable[idx], all_labels, cfg, training)

    labels_named = [class_names[i] for i in labels_arr]
    lineage = file_lineage(kept_keys, kept_paths, labels_named, parts, source)
    return _pipelines(
        pipeline, parts, labels_arr, class_names, cfg, source, skipped, lineage, held, check
    )


def file_lineage(keys: list[str], paths: list[str], labels: list[str], parts, source: str) -> dict:
    """The dataset record of image files: a table (path, label, split) and its digest."""
    table = {"path": paths, "label": labels, "split": split_names(len(paths), parts)}
    # the digest covers each file's key, so an edited image changes it
    rows = zip(keys, table["label"], table["split"], strict=True)
    # the common folder of the lexically first and last paths is every path's
    folder = os.path.commonpath([min(paths), max(paths)])
    return {
        "name": source or "images",
        "source": folder,
        "table": table,
        # each split's table rows in its pipeline's order: engine.label_errors names files by it
        "split_rows": dict(zip(SPLITS, (part.tolist() for part in parts), strict=True)),
        # the keys the digest covers (path, size, time, each stat'ed once), for the run's
        # reproduction record (engine.run_record)
        "keys": keys,
        "digest": text_digest("\t".join(row) + "\n" for row in rows),
    }


def _pipelines(pipeline, parts, labels, class_names, cfg, source, skipped, lineage, held, check):
    """(train_ds, val_ds, info) from a pipeline(indices, training) function, a split, the
    Source that holds the images and the data check."""
    train, val, test = parts
    info = DataInfo(
        image_shape=image_shape(cfg),
        class_names=list(class_names),
        train_count=len(train),
        val_count=len(val),
        skipped_files=skipped,
        source=source,
        test_count=len(test),
        class_counts=class_counts(labels, parts, len(class_names)),
        test_ds=pipeline(test, False) if len(test) else None,
        lineage=lineage,
        pipeline_params=held.plan.params(),
        data_check=check,
    )
    return pipeline(train, True), pipeline(val, False), info


def arrays_pipeline(
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    cfg: RunConfig,
    source: str = "",
    splits: list[str] | None = None,
) -> tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]:
    """Images in memory (N, H, W, C), pixel values 0..255, and label indices -> pipelines.

    `splits` as for files_pipeline; the test split is info.test_ds. The images are
    resized once, up front, to uint8. When they fit the memory budget they are held in
    memory and skip the disk cache; larger ones go through the cache (keyed by the
    arrays' digest and each image's index) and are streamed from it, and the arrays
    themselves can go once load_data returns.
    """
    labels_arr = np.asarray(labels, dtype=np.int32)
    require_classes(labels_arr, class_names)
    digest = array_digest(images, labels)
    # the check hashes the arrays as they are (any size), keyed by their digest
    keys = [f"arrays:{digest}:{i}" for i in range(len(labels_arr))]
    names = [f"{source or 'arrays'}[{i}]" for i in range(len(labels_arr))]
    parts, check = split_checked(
        keys, names, labels_arr, class_names, cfg, lambda at: np.asarray(images[at]), splits
    )
    used = np.concatenate(parts)  # resize only what the caps keep
    plan = plan_images(cfg, len(used))
    if plan.pipeline == "memory":
        resized = resize_images(np.asarray(images)[used], cfg.image_size, cfg.channels)
        held = Source(plan, {}, np.full(len(used), -1), images=as_tensor(resized))
    else:

        def decode(indices: list[int]) -> image_cache.Decoded:
            resized = resize_images(np.asarray(images)[used[indices]], cfg.image_size, cfg.channels)
            return image_cache.Decoded(resized, np.full(len(indices), -1, np.int64))

        held = load_source([keys[i] for i in used], decode, cfg, plan)
    row = np.zeros(len(labels_arr), np.int64)  # example index -> its row in `used`
    row[used] = np.arange(len(used))

    def pipeline(idx: np.ndarray, training: bool) -> tf.data.Dataset:
        return held.pipeline(row[idx], labels_arr[used], cfg, training)

    lineage = {"name": source or "arrays", "source": "", "digest": digest}
    return _pipelines(
        pipeline, parts, labels_arr, class_names, cfg, source, [], lineage, held, check
    )


def array_digest(*arrays: np.ndarray) -> str:
    """A short content hash of arrays (shape, dtype and every byte)."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()[:16]
