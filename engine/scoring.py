"""The chosen model scored once at the end of a run: validation, then the test split.

Both log exact metrics (scikit-learn, engine.evaluation) beside Keras' per-epoch
estimates, and their plots, into the active MLflow run. The same predictions, made by
a model that never trained on these images, then go through confident learning
(engine.label_errors): the run's likely label errors.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

from engine import evaluation, label_errors
from engine.images import DataInfo
from engine.network import class_probabilities


def predict_probabilities(model: keras.Model, ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(labels, (N, K) class probabilities) over a batched (images, labels) dataset."""
    labels, outputs = [], []
    for images, batch_labels in ds:
        labels.append(batch_labels.numpy())
        outputs.append(model.predict_on_batch(images))
    return np.concatenate(labels), class_probabilities(np.concatenate(outputs))


def log_evaluation(
    model: keras.Model, val_ds: tf.data.Dataset, info: DataInfo, history
) -> label_errors.Predictions:
    """Score the validation split once (scikit-learn) and log the scores and plots.

    Returns:
        The validation predictions, for log_test's likely label errors.
    """
    labels, probs = predict_probabilities(model, val_ds)
    scores = evaluation.classification_metrics(labels, probs)
    # one exact figure per metric for the final model, beside Keras' per-epoch estimates
    mlflow.log_metrics({f"final_val_{name}": value for name, value in scores.items()})
    with tempfile.TemporaryDirectory() as tmp:
        evaluation.plot_learning_curves(history, Path(tmp) / "learning_curves.png")
        evaluation.save_plots(labels, probs, info.class_names, Path(tmp))
        mlflow.log_artifacts(tmp, "plots")
    return label_errors.split_predictions(labels, probs, "val", info.lineage)


def log_test(
    model: keras.Model, info: DataInfo, val: label_errors.Predictions | None = None
) -> dict[str, float]:
    """Score the chosen model once on the test split; log test_* metrics and plots/test/.

    Nothing was chosen on these images (the best epoch and any tuning look at
    validation only), so these are the figures to report. Then the likely label errors
    among the validation (`val`, from log_evaluation) and test images are logged.
    Returns {} with no test split.
    """
    scores, found = {}, [val] if val is not None else []
    if info.test_ds is None:
        print("no test split (test_split=0 or too few images): nothing to report on test")
    else:
        labels, probs = predict_probabilities(model, info.test_ds)
        scores = _log_test_scores(labels, probs, info)
        found.append(label_errors.split_predictions(labels, probs, "test", info.lineage))
    if found:
        _log_label_errors(label_errors.combine(found), info.class_names)
    return scores


def _log_label_errors(found: label_errors.Predictions, class_names: list[str]) -> None:
    """label_errors.log_label_errors, which must never fail the run it reports on."""
    try:
        label_errors.log_label_errors(found, class_names)
    except Exception as err:  # a report of the data, not the model: the run goes on
        print(f"warning: could not log the likely label errors ({err})")


def _log_test_scores(labels: np.ndarray, probs: np.ndarray, info: DataInfo) -> dict[str, float]:
    """Log the test_* metrics and plots/test/ of the test predictions; return the metrics."""
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
