"""Imbalanced classes: a warning, balanced class weights, a sigmoid output's prior bias.

All three read the training split's images per class (DataInfo.class_counts, which
files_pipeline and arrays_pipeline fill in).
"""

from __future__ import annotations

import math

import keras
import numpy as np

from engine.config import UserError
from engine.images import DataInfo


def warn_imbalance(info: DataInfo) -> None:
    """Print a warning when the smallest class has under 10% of the largest's images."""
    counts = info.class_counts.get("train")
    if counts and min(counts) < 0.1 * max(counts):
        small = info.class_names[int(np.argmin(counts))]
        print(
            f"warning: imbalanced classes: {small} has {min(counts)} training images, "
            f"under 10% of the largest class's {max(counts)}. Accuracy says little here: "
            "watch balanced_accuracy and per-class recall, and consider "
            "--class-weight balanced"
        )


def class_weights(setting: str, info: DataInfo) -> dict[int, float] | None:
    """balanced: total / (classes x class count), from the training split; none: None.

    The weights apply to the training and the validation loss (network.weigh_classes),
    so the best epoch by val_loss is picked by the loss that was minimised.
    """
    counts = np.asarray(info.class_counts.get("train") or [], dtype=np.float64)
    if setting != "balanced":
        return None
    if not len(counts) or (counts == 0).any():
        raise UserError(
            "class_weight=balanced needs the training images per class (DataInfo.class_counts"
            "['train'], which files_pipeline and arrays_pipeline fill in), each above zero"
        )
    weights = counts.sum() / (len(counts) * counts)
    described = ", ".join(f"{n} {w:.2f}" for n, w in zip(info.class_names, weights, strict=True))
    print("  class weights: " + described)
    return {i: float(w) for i, w in enumerate(weights)}


def init_output_bias(model: keras.Model, info: DataInfo) -> None:
    """Start a sigmoid output at the class prior: bias = log(positives / negatives).

    The first epochs then learn features rather than the class balance. Only a final
    Dense layer of one unit is touched; any other head is left as the network made it.
    """
    counts = info.class_counts.get("train")
    last = model.layers[-1]
    if not counts or min(counts) == 0 or not isinstance(last, keras.layers.Dense):
        return
    if last.units != 1 or last.bias is None:
        return
    last.bias.assign(np.full(last.bias.shape, math.log(counts[1] / counts[0]), np.float32))


def describe_counts(counts: list[int], class_names: list[str]) -> str:
    """'cat=12, dog=30' for a param (cut to fit MLflow's 6,000 characters)."""
    text = ", ".join(f"{n}={c}" for n, c in zip(class_names, counts, strict=True))
    return text if len(text) <= 6000 else text[:5996] + " ..."
