"""The network contract, checked before any MLflow run exists.

define_network(input_shape, num_classes, cfg) returns a keras.Model that takes a
batch of raw pixels (float32, 0..255, shape (None, *input_shape)) and outputs
class probabilities, in one of two shapes:

    (None, 1)            two classes: one sigmoid unit, the probability of class 1
    (None, num_classes)  K softmax units (K = 2 included), one probability per class

Training feeds it uint8 pixels (a quarter of float32's bytes to the device): a
functional or Sequential model casts them to its float32 input itself, any other
model is wrapped in a functional one that does (`accepting_uint8`).

It may come compiled or not. An uncompiled model is compiled here to fit its
output (binary or categorical cross-entropy, Adam at cfg.learning_rate along
cfg.lr_schedule, accuracy, AUC, precision and recall). Labels are encoded to match
the head, and every later step (evaluation, plots, predict, serve) reads
probabilities through `class_probabilities`, so the two shapes behave the same
everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from engine.config import RunConfig, UserError

CONTRACT = (
    "define_network(input_shape, num_classes, cfg) must return a keras.Model whose "
    "output is (batch, 1) sigmoid probabilities for two classes, or (batch, num_classes) "
    "softmax probabilities; compiled or not (an uncompiled model is compiled to fit)."
)


# define_network's type: (input_shape, num_classes, cfg) -> keras.Model
DefineNetwork = Callable[[tuple[int, int, int], int, Any], keras.Model]


@dataclass(frozen=True)
class Head:
    """How a model's output and its labels are shaped."""

    units: int  # 1 (sigmoid, two classes) or the number of classes (softmax)
    sparse_labels: bool  # a compiled model whose loss takes class indices, not one-hot rows

    @property
    def binary(self) -> bool:
        return self.units == 1


def _loss_name(loss: Any) -> str:
    if isinstance(loss, str):
        return loss
    return getattr(loss, "name", None) or getattr(loss, "__name__", "") or type(loss).__name__


def build_network(
    define_network: Callable[..., Any],
    input_shape: tuple[int, int, int],
    num_classes: int,
    cfg: RunConfig,
    steps_per_epoch: int = 1,
) -> tuple[keras.Model, Head]:
    """Call define_network, check its model against the contract, compile it if needed.

    Call it inside the distribution strategy's scope. steps_per_epoch sets the length
    of the learning-rate schedule of a model compiled here.

    Raises:
        UserError: the model breaks the contract (wrong type, output shape, or outputs
            that are not probabilities); the message states the contract.
    """
    try:
        model = define_network(input_shape, num_classes, cfg)
    except UserError:
        raise
    except (ValueError, TypeError) as err:
        raise UserError(
            f"define_network{(input_shape, num_classes)} failed: {err}\n{CONTRACT}"
        ) from err
    except Exception as err:  # keras.utils.get_file raises a bare Exception when offline
        if "URL fetch failure" not in str(err):
            raise
        raise UserError(
            f"define_network could not download what it needs: {err}. Check the network "
            "(and HTTPS_PROXY), or put the file where Keras looks (~/.keras/models/), or "
            "train a network that needs no download (the example: --weights none, or "
            "--convolutions 3)."
        ) from None
    if not isinstance(model, keras.Model):
        raise UserError(f"define_network returned {type(model).__name__}, not a model. {CONTRACT}")
    head = check_outputs(model, input_shape, num_classes)
    model = accepting_uint8(model, input_shape)
    if not model.compiled:
        compile_for_head(model, head, cfg, steps_per_epoch)
        return model, head
    sparse = "sparse" in _loss_name(model.loss)
    if head.binary and sparse:
        raise UserError(
            f"the model has one output unit but is compiled with {_loss_name(model.loss)}; "
            "use binary_crossentropy (or return it uncompiled). " + CONTRACT
        )
    return model, Head(head.units, sparse)


def check_monitor(
    model: keras.Model, val_ds: tf.data.Dataset, head: Head, num_classes: int, monitor: str
) -> None:
    """The monitored metric must be one the compiled model reports; checked on one batch.

    Raises:
        UserError: naming the metrics the model does report.
    """
    names = model.evaluate(
        encode_labels(val_ds.take(1), head, num_classes), verbose=0, return_dict=True
    )
    if monitor.removeprefix("val_") not in names:
        raise UserError(
            f"monitor '{monitor}' is not reported by the compiled model, whose metrics are "
            f"{', '.join('val_' + n for n in sorted(names))}; set --monitor to one of those, "
            "or compile the model with that metric"
        )


def check_outputs(model: keras.Model, input_shape: tuple[int, ...], num_classes: int) -> Head:
    """Run the model on two random images; its outputs must be probabilities of the right shape."""
    images = np.random.default_rng(0).uniform(0, 255, (2, *input_shape)).astype("float32")
    try:
        outputs = np.asarray(model(images, training=False), dtype=np.float64)
    except Exception as err:
        raise UserError(
            f"the model does not accept images of shape {input_shape}: {err}\n{CONTRACT}"
        ) from err
    units = outputs.shape[-1] if outputs.ndim == 2 else None
    wanted = "1 or 2" if num_classes == 2 else str(num_classes)
    if units is None or (units != num_classes and not (units == 1 and num_classes == 2)):
        raise UserError(
            f"the model outputs shape {tuple(outputs.shape)} for a batch of 2, but the data "
            f"has {num_classes} classes, so the output must be (2, {wanted}). {CONTRACT}"
        )
    if not np.all((outputs >= -1e-3) & (outputs <= 1 + 1e-3)):
        raise UserError(
            "the model's outputs are not probabilities (values outside 0..1): end it with "
            f"a sigmoid or softmax activation. {CONTRACT}"
        )
    if units > 1 and not np.allclose(outputs.sum(axis=1), 1.0, atol=1e-2):
        raise UserError(
            f"the model's {units} outputs do not sum to 1: end it with a softmax. {CONTRACT}"
        )
    return Head(units, sparse_labels=False)


def accepting_uint8(model: keras.Model, input_shape: tuple[int, ...]) -> keras.Model:
    """The model, taking the pipelines' uint8 pixels and casting them to float on the device.

    A functional or Sequential model does so already (Keras casts inputs to its Input's
    float32); any other model is wrapped in a functional one that does. Clients still
    send float32 pixels to the logged and served model, as before.
    """
    try:
        model(np.zeros((1, *input_shape), np.uint8), training=False)
        return model
    except Exception:  # e.g. a subclassed model whose first layer wants floats
        pass
    inputs = keras.Input(shape=input_shape, name="image")
    wrapped = keras.Model(inputs, model(inputs), name=model.name)
    if model.compiled:
        wrapped.compile_from_config(model.get_compile_config())
    return wrapped


def learning_rate(
    cfg: RunConfig, steps_per_epoch: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """cfg.learning_rate, constant or decayed to 0 along a cosine over all training steps."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    return keras.optimizers.schedules.CosineDecay(
        cfg.learning_rate, decay_steps=max(1, cfg.epochs * steps_per_epoch)
    )


def compile_for_head(
    model: keras.Model, head: Head, cfg: RunConfig, steps_per_epoch: int = 1
) -> None:
    """Compile an uncompiled model: cross-entropy to fit its head, Adam, four metrics."""
    accuracy = (
        keras.metrics.BinaryAccuracy(name="accuracy")
        if head.binary
        else keras.metrics.CategoricalAccuracy(name="accuracy")
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(cfg, steps_per_epoch)),
        loss="binary_crossentropy" if head.binary else "categorical_crossentropy",
        metrics=[
            accuracy,
            keras.metrics.AUC(name="auc", num_thresholds=1000),
            keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"),
        ],
        jit_compile=cfg.xla,
    )


def encode_labels(ds: tf.data.Dataset, head: Head, num_classes: int) -> tf.data.Dataset:
    """(images, class index[, sample weight]) batches -> labels shaped for the head's loss."""
    if head.binary:
        return ds.map(lambda x, y, *w: (x, tf.cast(y, tf.float32)[..., tf.newaxis], *w))
    if head.sparse_labels:
        return ds
    return ds.map(lambda x, y, *w: (x, tf.one_hot(y, num_classes), *w))


def weigh_classes(ds: tf.data.Dataset, weights: dict[int, float] | None) -> tf.data.Dataset:
    """(images, class index) batches -> (images, class index, each image's class weight).

    Given to training and validation alike, so the validation loss that picks the best
    epoch is the loss training minimises (Keras' class_weight weighs training only).
    """
    if not weights:
        return ds
    table = tf.constant([weights[k] for k in sorted(weights)], tf.float32)
    return ds.map(lambda x, y: (x, y, tf.gather(table, y)))


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Model outputs -> (N, K) class probabilities; a single sigmoid column becomes two."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 1:
        outputs = outputs[:, None]
    if outputs.shape[1] == 1:
        return np.concatenate([1.0 - outputs, outputs], axis=1)
    return outputs
