"""Scores and plots of a model's class probabilities, computed in one place.

ROC, AUC and the confusion matrix come from scikit-learn, which handles tied
scores correctly (saturated sigmoid outputs tie all the time). Training's final
evaluation and `lifecycle.py validate` both use these functions.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """accuracy, balanced_accuracy, loss (cross-entropy), auc, precision, recall, f1 of
    (N, K) probabilities.

    Two classes: precision, recall and f1 of class index 1 (the positive class),
    ROC AUC of its probability. More classes: macro averages, and the macro
    one-vs-rest AUC over the classes present. `auc` is left out when the labels
    hold a single class (it is undefined then).
    """
    from sklearn import metrics

    labels = np.asarray(labels, dtype=int)
    count, num_classes = probs.shape
    predicted = probs.argmax(axis=1)
    picked = np.clip(probs[np.arange(count), labels], 1e-7, 1.0)
    binary = num_classes == 2
    average = "binary" if binary else "macro"
    every_class = list(range(num_classes))
    scores = {
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "loss": float(-np.log(picked).mean()),
    }
    options = {"average": average, "labels": None if binary else every_class, "zero_division": 0}
    for name, score in (
        ("precision", metrics.precision_score),
        ("recall", metrics.recall_score),
        ("f1", metrics.f1_score),
    ):
        scores[name] = float(score(labels, predicted, **options))
    scores["balanced_accuracy"] = float(metrics.balanced_accuracy_score(labels, predicted))
    area = roc_auc(labels, probs)
    if area is not None:
        scores["auc"] = area
    return scores


def per_class_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names: list[str]
) -> dict[str, float]:
    """precision_<class> and recall_<class> for every class (names from class_metric_names)."""
    from sklearn import metrics

    every_class = list(range(len(class_names)))
    predicted = probs.argmax(axis=1)
    safe_names = class_metric_names(class_names)
    scores = {}
    for name, score in (("precision", metrics.precision_score), ("recall", metrics.recall_score)):
        values = score(labels, predicted, labels=every_class, average=None, zero_division=0)
        for class_name, value in zip(class_names, values, strict=True):
            scores[f"{name}_{safe_names[class_name]}"] = float(value)
    return scores


def metric_safe(name: str) -> str:
    """A class name as MLflow accepts in a metric name (letters, digits, _ - . / space)."""
    return re.sub(r"[^\w\-. /]", "_", str(name))


def class_metric_names(class_names: list[str]) -> dict[str, str]:
    """Each class's name in metric names: metric_safe, made unique.

    Two names can become one (`cats∕dogs` with U+2215 and `cats_dogs`). A class whose name
    is already safe keeps it; one whose name had to change gets a suffix when it would clash
    (`cats_dogs_2`), so no class's metrics overwrite another's. The run logs this mapping
    (class_metric_names.json).

    Args:
        class_names: the classes in label order.

    Returns:
        {class name: its name in metric names}.
    """
    taken = {name for name in class_names if metric_safe(name) == name}
    names: dict[str, str] = {}
    for class_name in class_names:
        base = metric_safe(class_name)
        candidate, suffix = base, 2
        if base != class_name:
            while candidate in taken:
                candidate = f"{base}_{suffix}"
                suffix += 1
            taken.add(candidate)
        names[class_name] = candidate
    return names


def roc_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC: of class 1's probability for two classes, else macro one-vs-rest.

    Returns None when fewer than two classes are present in `labels`.
    """
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels, dtype=int)
    present = np.unique(labels)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    # one-vs-rest over the classes that occur: a class absent from the labels has no ROC
    areas = [roc_auc_score(labels == k, probs[:, k]) for k in present]
    return float(np.mean(areas))


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend (training has no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)


def plot_learning_curves(history: dict[str, list[float]], path: Path) -> None:
    """loss, accuracy and auc per epoch, training against validation."""
    plt = _pyplot()
    names = [m for m in ("loss", "accuracy", "auc") if m in history] or ["loss"]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        values = history.get(name, [])
        epochs = np.arange(1, len(values) + 1)
        ax.plot(epochs, values, "o-", label="train")
        if f"val_{name}" in history:
            ax.plot(epochs, history[f"val_{name}"], "o-", label="validation")
        ax.set(title=name, xlabel="epoch")
        ax.legend()
    _save_figure(fig, path)


def plot_confusion_matrix(
    labels: np.ndarray,
    predicted: np.ndarray,
    class_names: list[str],
    path: Path,
    split: str = "validation",
) -> np.ndarray:
    """Draw and save the confusion matrix (rows: true class); return it."""
    from sklearn.metrics import confusion_matrix

    plt = _pyplot()
    k = len(class_names)
    matrix = confusion_matrix(labels, predicted, labels=list(range(k)))
    fig, ax = plt.subplots(figsize=(1.2 * k + 3, 1.2 * k + 2.5))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(j, i, str(count), ha="center", va="center", color=color)
    ax.set(
        xticks=range(k),
        yticks=range(k),
        xlabel="predicted",
        ylabel="true",
        title=f"{split} confusion matrix",
    )
    ax.set_xticklabels(class_names, rotation=45, ha="right")
    ax.set_yticklabels(class_names)
    _save_figure(fig, path)
    return matrix


def plot_roc(
    labels: np.ndarray, scores: np.ndarray, path: Path, split: str = "validation"
) -> float:
    """Draw and save the ROC curve of class 1's scores; return its area (scikit-learn's)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fpr, tpr, _ = roc_curve(labels, scores)
    area = float(roc_auc_score(labels, scores))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC = {area:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{split} ROC")
    ax.legend(loc="lower right")
    _save_figure(fig, path)
    return area


def save_plots(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    folder: Path,
    split: str = "validation",
) -> list[Path]:
    """The confusion matrix, and for two classes the ROC curve, as PNGs in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "confusion_matrix.png"]
    plot_confusion_matrix(labels, probs.argmax(axis=1), class_names, written[0], split)
    if len(class_names) == 2 and len(np.unique(labels)) == 2:
        written.append(folder / "roc_curve.png")
        plot_roc(labels, probs[:, 1], written[-1], split)
    return written
