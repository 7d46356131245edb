"""The chosen model scored once at the end of a run: validation, then the test split.

Both log exact metrics (scikit-learn, engine.evaluation) beside Keras' per-epoch
estimates, and their plots, into the active MLflow run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

from engine import evaluation
from engine.images import DataInfo
from engine.network import class_probabilities


def predict_probabilities(model: keras.Model, ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(labels, (N, K) class probabilities) over a batched (images, labels) dataset."""
    labels, outputs = [], []
    for images, batch_labels in ds:
        labels.append(batch_labels.numpy())
        outputs.append(model.predict_on_batch(images))
    return np.concatenate(labels), class_probabilities(np.concatenate(outputs))


def log_evaluation(model: keras.Model, val_ds: tf.data.Dataset, info: DataInfo, history) -> None:
    """Score the validation split once (scikit-learn) and log the scores and plots."""
    labels, probs = predict_probabilities(model, val_ds)
    scores = evaluation.classification_metrics(labels, probs)
    # one exact figure per metric for the final model, beside Keras' per-epoch estimates
    mlflow.log_metrics({f"final_val_{name}": value for name, value in scores.items()})
    with tempfile.TemporaryDirectory() as tmp:
        evaluation.plot_learning_curves(history, Path(tmp) / "learning_curves.png")
        evaluation.save_plots(labels, probs, info.class_names, Path(tmp))
        mlflow.log_artifacts(tmp, "plots")


def log_test(model: keras.Model, info: DataInfo) -> dict[str, float]:
    """Score the chosen model once on the test split; log test_* metrics and plots/test/.

    Nothing was chosen on these images (the best epoch and any tuning look at
    validation only), so these are the figures to report. Returns {} with no test split.
    """
    if info.test_ds is None:
        print("no test split (test_split=0 or too few images): nothing to report on test")
        return {}
    labels, probs = predict_probabilities(model, info.test_ds)
    scores = evaluation.classification_metrics(labels, probs)
    scores.update(evaluation.per_class_metrics(labels, probs, info.class_names))
    scores = {f"test_{name}": value for name, value in scores.items()}
    mlflow.log_metrics(scores)
    names = evaluation.class_metric_names(info.class_names)
    if any(safe != name for name, safe in names.items()):  # which metric is whose
        mlflow.log_dict(names, "class_metric_names.json")
    with tempfile.TemporaryDirectory() as tmp:
        evaluation.save_plots(labels, probs, info.class_names, Path(tmp), split="test")
        mlflow.log_artifacts(tmp, "plots/test")
    return scores
