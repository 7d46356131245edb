"""Keras 3.15 `fit` under MultiWorkerMirroredStrategy: the patches it needs.

`fit` does not run under this strategy as shipped (keras-team/keras#20585,
tensorflow/tensorflow#72388); `patch_keras` changes the two places that fail, and only
when this strategy is in use (engine.multiworker.make_strategy alone calls it).
tests/test_multiworker.py runs plain Keras without the patch and expects the failure:
when it passes, upstream is fixed and those two patches go. A third lets a worker read
only its share of the data (a pipeline marked by per_worker_options, engine.stream).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf
from keras.src.backend.tensorflow import trainer as keras_trainer
from tensorflow.python.data.experimental.ops import distribute as tf_distribute_ops


def per_worker_options() -> tf.data.Options:
    """The mark of a pipeline that holds only this worker's share, in batches of its part
    of the global batch: no auto-shard (shard leaves it alone), and under this strategy
    Keras' fit hands it to each worker's replicas as it is (_per_worker_iterator)."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return options


def is_per_worker(ds: Any) -> bool:
    """True for a dataset marked by per_worker_options."""
    off = tf.data.experimental.AutoShardPolicy.OFF
    return (
        isinstance(ds, tf.data.Dataset)
        and ds.options().experimental_distribute.auto_shard_policy == off
    )


_ORIGINAL_REDUCE = keras_trainer.reduce_per_replica


def _build_from_local_batch(self, iterator=None, data_batch=None):
    """TensorFlowTrainer._maybe_symbolic_build, building from this worker's first replica's
    batch instead of a cross-worker MEAN of it (which fails on a PerReplica value)."""
    if self._distribute_strategy is None:
        return
    if iterator is not None:
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tf.nest.map_structure(
                lambda x: (
                    self.distribute_strategy.experimental_local_results(x)[0]
                    if isinstance(x, tf.distribute.DistributedValues)
                    else x
                ),
                batch,
            )
            break
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _reduce_scalars_too(values, strategy, reduction):
    """keras' reduce_per_replica, reducing scalar logs with axis=None under
    MultiWorkerMirroredStrategy (axis=0 fails on a scalar)."""
    if not keras_trainer._collective_all_reduce_multi_worker(strategy) or reduction not in (
        "auto",
        "mean",
    ):
        return _ORIGINAL_REDUCE(values, strategy, reduction)

    def mean(value):
        local = strategy.experimental_local_results(value)[0]
        return strategy.reduce("MEAN", value, axis=0 if local.shape.rank else None)

    return tf.nest.map_structure(mean, values)


_ORIGINAL_ITERATOR_INIT = keras_trainer.TFEpochIterator.__init__


def _per_worker_iterator(self, distribute_strategy=None, *args, **kwargs):
    """TFEpochIterator.__init__; a dataset that holds only this worker's share
    (is_per_worker) goes to distribute_datasets_from_function, which gives its batches
    to this worker's replicas as they are, instead of experimental_distribute_dataset,
    which takes each batch for a global one and keeps only this worker's part of it."""
    _ORIGINAL_ITERATOR_INIT(self, distribute_strategy, *args, **kwargs)
    dataset = self.data_adapter.get_tf_dataset()
    strategy = self._distribute_strategy
    if not (keras_trainer._collective_all_reduce_multi_worker(strategy) and is_per_worker(dataset)):
        return

    def replica_batches(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = context.num_replicas_in_sync // context.num_input_pipelines
        # each local replica takes its own batch: cut the worker's batches in `local`
        return dataset if local == 1 else tf_distribute_ops._LegacyRebatchDataset(dataset, local)

    self._distributed_dataset = strategy.distribute_datasets_from_function(replica_batches)


def patch_keras() -> None:
    """Apply the patches (idempotent). make_strategy alone calls it, so a process that
    trains on one machine runs Keras as shipped. The first two make fit run under this
    strategy at all; _per_worker_iterator lets a worker read only its share."""
    keras_trainer.TensorFlowTrainer._maybe_symbolic_build = _build_from_local_batch
    keras_trainer.reduce_per_replica = _reduce_scalars_too
    keras_trainer.TFEpochIterator.__init__ = _per_worker_iterator
