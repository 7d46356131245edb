"""Batches read from the decoded-image cache on disk: memory that does not grow with the data.

A split is a list of (shard, row) places (`SplitRows`); each batch of it is read with
`os.preadv` straight into a new array, inside a `tf.numpy_function` that tf.data runs
in parallel (AUTOTUNE) and prefetches. Only the batches in flight are in memory; the
kernel's page cache keeps what the machine can spare of the shards, and gives it back
under pressure (page cache is not the process's memory, and a cgroup reclaims it
before it runs out).

Why this and not tf.data's FixedLengthRecordDataset over the shards: that reads a
shard front to back, so a split (a random subset of rows) reads every other split's
rows too, and shuffling means a buffer of images that grows with the shuffle's
reach; measured on 2 cores, 64 px, it gave 21k to 30k img/s against 50k to 85k for
reads by row (doc/benchmarks.md, "Larger than memory").

Order: validation and test batches come in the split's own order (the seeded order
split_indices gives, the same whichever pipeline holds the images). The training
split is read in a new permutation of all its images every epoch, a true global
shuffle, and the same seed gives the same sequence of epochs: up to SMALL_SPLIT
images through tf.data's shuffle of their positions (a buffer of all of them, a few
MB), above it by `tf.random.experimental.index_shuffle`, which maps position i to its
place in a permutation keyed by (a per-epoch draw of tf.data's seeded random dataset,
cfg.seed), with no buffer at all. Within a batch the reads go in file order (a batch
is a set; the model does not see the order inside it).

Training over several workers (engine.multiworker), each worker's training pipeline
reads only its share, `SplitRows.part(index, count)` (every count-th image of the
split), in batches of its part of the global batch: the others' rows are never read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from engine import multiworker
from engine.config import RunConfig
from engine.decoding import aligned_zeros
from engine.keras_patches import per_worker_options
from engine.shards import Located

# Training splits up to this many images are shuffled through a buffer of their positions
# (an epoch starts in ~1 ms); larger ones by index_shuffle (no buffer; ~15 ms a start).
SMALL_SPLIT = 1 << 16
# Images read per call into Python: READ_BATCHES batches, fewer when that passes READ_BYTES.
# Measured on 2 cores at 128 px: 8 batches a call stream ~1.5x faster than 1.
READ_BATCHES, READ_BYTES = 8, 16 << 20


@dataclass
class SplitRows:
    """The images of one split, in its order: where each lies (file descriptor, byte
    offset) and its label. `located` keeps the shards open while this exists."""

    fds: np.ndarray  # (n,) int64
    offsets: np.ndarray  # (n,) int64
    labels: np.ndarray  # (n,) int32
    shape: tuple[int, int, int]
    located: Located

    @classmethod
    def of(cls, located: Located, positions: np.ndarray, labels: np.ndarray, shape) -> SplitRows:
        """The rows of located's keys at `positions`, with their labels (one per position)."""
        record = int(np.prod(shape))
        shard = located.shard[positions]
        if (shard < 0).any():
            raise ValueError("a split holds an image that failed to decode")
        fd = np.array([s.fd for s in located.shards], np.int64)
        start = np.array([s.offset for s in located.shards], np.int64)
        offsets = start[shard] + located.row[positions] * record
        return cls(fd[shard], offsets, np.asarray(labels, np.int32), tuple(shape), located)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def nbytes(self) -> int:
        """Bytes of one image."""
        return int(np.prod(self.shape))

    def part(self, index: int, count: int) -> SplitRows:
        """Worker `index` of `count`'s share: every count-th image from the index-th, the
        same number for every worker (workers step together, so the last len % count
        images of the split's order, fewer than `count`, sit out)."""
        pick = slice(index, len(self) // count * count, count)
        return SplitRows(
            self.fds[pick], self.offsets[pick], self.labels[pick], self.shape, self.located
        )

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The images and labels at `positions` of the split, in that order; read in file
        order. Runs in tf.data's threads: os.preadv lets go of the GIL while it copies."""
        fds, offsets = self.fds[positions], self.offsets[positions]
        out = aligned_zeros((len(positions), *self.shape), zeros=False)  # taken without a copy
        record = out[0].nbytes if len(out) else 0
        fd_list, offset_list = fds.tolist(), offsets.tolist()
        for j in np.lexsort((offsets, fds)).tolist():
            if os.preadv(fd_list[j], [out[j]], offset_list[j]) != record:
                raise OSError(f"a cache shard was cut short while this run read it (fd {fds[j]})")
        return out, self.labels[positions]


def stream_pipeline(rows: SplitRows, cfg: RunConfig, training: bool) -> tf.data.Dataset:
    """A split's batches of (uint8 images, int32 labels), read from the cache's shards.

    The training one is a new seeded permutation of the whole split every epoch (see the
    module's notes); the others keep the split's order.
    """
    batch = cfg.batch_size
    share = multiworker.worker_share(cfg.distribute_mode()) if training else None
    if share is not None:  # this worker's rows, in batches of its part of the global batch
        rows, batch = rows.part(*share), cfg.batch_size // share[1]
    count = len(rows)
    # positions in reads of several batches (fewer calls into Python), cut back to batches
    per_read = batch * max(1, min(READ_BATCHES, READ_BYTES // (batch * rows.nbytes)))
    positions = tf.data.Dataset.range(count)
    if training and count <= SMALL_SPLIT:
        # a buffer of every position: the quickest epoch start, SMALL_SPLIT * ~200 bytes
        positions = positions.shuffle(max(count, 1), seed=cfg.seed, reshuffle_each_iteration=True)
    positions = positions.batch(per_read)
    if training and count > SMALL_SPLIT:
        positions = _permuted(positions, count, cfg.seed)

    def fetch(at: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = tf.numpy_function(rows.read, [at], [tf.uint8, tf.int32], stateful=False)
        images.set_shape((None, *rows.shape))
        labels.set_shape((None,))
        return images, labels

    batches = positions.map(fetch, num_parallel_calls=tf.data.AUTOTUNE).rebatch(batch)
    batches = batches.apply(tf.data.experimental.assert_cardinality(math.ceil(count / batch)))
    batches = batches.prefetch(tf.data.AUTOTUNE)
    return batches if share is None else batches.with_options(per_worker_options())


def _permuted(positions: tf.data.Dataset, count: int, seed: int) -> tf.data.Dataset:
    """positions (0..count-1 in order, batched) through a new permutation every epoch."""
    seed_tensor = tf.constant(seed, tf.int64)

    def permuted(draw: tf.Tensor) -> tf.data.Dataset:
        key = tf.stack([draw, seed_tensor])
        return positions.map(lambda at: tf.random.experimental.index_shuffle(at, key, count - 1))

    draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    return draws.flat_map(permuted)
