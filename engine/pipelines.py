"""Decoded images into tf.data pipelines: held in memory, or streamed from the disk cache.

Every built-in source hands its images' cache keys and a decode function to
`load_source`, which asks engine.memory for the plan (`--memory-budget`): a data set
that fits is read into one in-memory tensor (`memory_pipeline`, the fastest epochs);
a larger one stays in the cache's shards and is read batch by batch
(engine.stream), so memory does not grow with the data. Both give the same splits,
the same images in each, and batches of the same shapes and types.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from engine import cache as image_cache
from engine.config import RunConfig
from engine.decoding import ALIGN, decode_files, decode_pieces
from engine.memory import Plan, format_size, plan_for
from engine.shards import Located
from engine.stream import SplitRows, stream_pipeline


def memory_pipeline(
    images, labels, cfg: RunConfig, training: bool, indices: np.ndarray | None = None
) -> tf.data.Dataset:
    """Decoded uint8 images in memory and their labels -> batched, prefetched pipeline.

    Args:
        images: (N, H, W, C) uint8, a numpy array or a tf.Tensor; the pipelines of
            several splits can share one tensor of the whole set.
        labels: (N,) class indices.
        indices: the examples of this pipeline (default: all N). Gathered in one op
            from the tensor: cheaper than a numpy copy that is then made a tensor.

    The images are in memory already, so nothing is cached again; the training one
    is reshuffled every epoch, through a buffer of up to 10,000 images (all of them
    when the split is smaller).
    """
    images = tf.convert_to_tensor(images)
    labels = tf.convert_to_tensor(np.asarray(labels, np.int32))
    if indices is not None:
        images, labels = tf.gather(images, indices), tf.gather(labels, indices)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        buffer = min(max(int(labels.shape[0]), 1), 10_000)
        ds = ds.shuffle(buffer, seed=cfg.seed, reshuffle_each_iteration=True)
    return ds.batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE)


@dataclass
class Source:
    """The decoded images of a list of keys: in memory (`images`) or on disk (`located`)."""

    plan: Plan
    failures: dict[int, str]  # key index -> why it did not decode
    labels: np.ndarray  # (N,) the labels stored with the images (TFDS), -1 where none
    images: tf.Tensor | None = field(default=None, repr=False)
    located: Located | None = field(default=None, repr=False)

    def ok(self) -> np.ndarray:
        """A boolean mask of the keys whose image decoded."""
        mask = np.ones(len(self.labels), bool)
        mask[list(self.failures)] = False
        return mask

    def read(self, positions: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        """The decoded images of the keys at `positions` (a few thousand at a time: the data
        check reads a streamed set a piece at a time)."""
        if self.located is not None:
            at = np.asarray(positions, np.int64)
            rows = SplitRows.of(self.located, at, np.zeros(len(at), np.int32), shape)
            return rows.read(np.arange(len(at)))[0]
        return tf.gather(self.images, np.asarray(positions, np.int64)).numpy()

    def pipeline(
        self, positions: np.ndarray, labels: np.ndarray, cfg: RunConfig, training: bool
    ) -> tf.data.Dataset:
        """The batches of the keys at `positions` (a split, in its order).

        Args:
            labels: every key's label (N,), as class indices.
        """
        if self.located is not None:
            shape = (cfg.image_size, cfg.image_size, cfg.channels)
            rows = SplitRows.of(self.located, positions, np.asarray(labels)[positions], shape)
            return stream_pipeline(rows, cfg, training)
        return memory_pipeline(self.images, labels, cfg, training, positions)


class FileDecoder:
    """The cache's decode function for image files: indices of paths -> their images.

    Called with some indices, it decodes those; `pieces` decodes many in one parallel
    pass, handing them on a piece at a time (engine.cache_store writes each as it comes).
    """

    def __init__(self, paths: list[str], cfg: RunConfig):
        self.paths, self.shape = paths, (cfg.image_size, cfg.image_size, cfg.channels)

    def __call__(self, indices: list[int]) -> image_cache.Decoded:
        size, channels = self.shape[0], self.shape[2]
        images, failures = decode_files([self.paths[i] for i in indices], size, channels)
        return image_cache.Decoded(images, -np.ones(len(indices), np.int64), failures)

    def pieces(self, indices: list[int]) -> Iterator[tuple[list[int], image_cache.Decoded]]:
        """(indices, their Decoded) pieces: decoded images, then the files that failed."""
        paths = [self.paths[i] for i in indices]
        for at, images, failed in decode_pieces(paths, self.shape[0], self.shape[2]):
            if len(at):
                unlabeled = -np.ones(len(at), np.int64)
                yield [indices[j] for j in at.tolist()], image_cache.Decoded(images, unlabeled)
            if failed:
                zeros = np.zeros((len(failed), *self.shape), np.uint8)
                reasons = dict(enumerate(failed.values()))
                decoded = image_cache.Decoded(zeros, -np.ones(len(failed), np.int64), reasons)
                yield [indices[j] for j in failed], decoded


def plan_images(cfg: RunConfig, count: int) -> Plan:
    """The plan for `count` decoded images of the run's size, by cfg.memory_budget."""
    return plan_for(cfg.memory_budget, count, cfg.image_size**2 * cfg.channels)


def load_source(
    keys: list[str], decode: image_cache.Decode, cfg: RunConfig, plan: Plan | None = None
) -> Source:
    """The decoded images of keys, held as the plan says (default: plan_images for them).

    Streaming needs the disk cache; where there is none (--cache false, or it cannot be
    written), the images are held in memory, with a note.
    """
    shape = (cfg.image_size, cfg.image_size, cfg.channels)
    plan = plan or plan_images(cfg, len(keys))
    if plan.pipeline == "stream":
        located = image_cache.locate_images(keys, decode, cfg.cache, cfg.cache_dir, shape)
        if located is not None:
            print(
                f"data: {format_size(plan.decoded_bytes)} of decoded images, streamed from "
                f"the disk cache (memory budget {format_size(plan.budget)})"
            )
            return Source(plan, located.failures, located.labels, located=located)
        print(
            f"note: the {format_size(plan.decoded_bytes)} of decoded images are over the "
            f"memory budget of {format_size(plan.budget)} but are held in memory, which "
            "may not hold them"
        )
        plan = dataclasses.replace(plan, pipeline="memory")
    decoded = image_cache.load_images(keys, decode, cfg.cache, cfg.cache_dir, shape)
    # one tensor of all decoded images; each split's pipeline gathers its own from it
    return Source(plan, decoded.failures, decoded.labels, images=as_tensor(decoded.images))


def as_tensor(images: np.ndarray) -> tf.Tensor:
    """A uint8 array as a tensor, sharing its memory where it is aligned (DLPack).

    tf.convert_to_tensor copies an array, twice when it is not 64-byte aligned (numpy's
    are 16): three times the decoded set at once. The decoders and the cache fill
    aligned arrays (engine.decoding.aligned_zeros), which become tensors as they are.
    """
    if images.size and images.flags.c_contiguous and images.ctypes.data % ALIGN == 0:
        with contextlib.suppress(BufferError):  # e.g. a read-only array: copied below
            return tf.experimental.dlpack.from_dlpack(images.__dlpack__())
    return tf.convert_to_tensor(images)
