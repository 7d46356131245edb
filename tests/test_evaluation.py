"""Scores and plots: scikit-learn's numbers, one AUC everywhere, tied scores included."""

from __future__ import annotations

import numpy as np
import pytest

from engine.evaluation import classification_metrics, plot_roc, roc_auc, save_plots
from engine.network import class_probabilities


def test_binary_metrics_match_hand_counts():
    labels = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.8, 0.4, 0.9])  # predicted: 0 1 1 0 1
    metrics = classification_metrics(labels, class_probabilities(p1[:, None]))
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["precision"] == pytest.approx(2 / 3)  # of 3 predicted positives, 2 right
    assert metrics["recall"] == pytest.approx(2 / 3)  # of 3 true positives, 2 found
    assert metrics["auc"] == pytest.approx(5 / 6)  # 5 of 6 (pos, neg) pairs ordered right
    expected_loss = -np.mean(np.log([0.9, 0.4, 0.8, 0.4, 0.9]))
    assert metrics["loss"] == pytest.approx(expected_loss)


def test_multiclass_metrics_are_macro_averages():
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.2, 0.2]])
    metrics = classification_metrics(labels, probs)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["precision"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert metrics["recall"] == pytest.approx((1 + 1 + 0.5) / 3)


@pytest.mark.parametrize(
    "labels", [[1, 1, 0, 0, 1, 0], [0, 0, 1, 1, 1, 0]], ids=["ties-first", "ties-last"]
)
def test_tied_scores_give_the_exact_auc(labels, tmp_path):
    # Four tied top scores, two of each class: each tie counts half a pair either way.
    # 9 (positive, negative) pairs; 5 ordered right, counting ties as one half -> 5/9.
    labels = np.array(labels)
    scores = np.array([1, 1, 1, 1, 0.2, 0.1])
    probs = class_probabilities(scores)
    assert roc_auc(labels, probs) == pytest.approx(5 / 9)
    assert classification_metrics(labels, probs)["auc"] == pytest.approx(5 / 9)
    assert plot_roc(labels, scores, tmp_path / "roc.png") == pytest.approx(5 / 9)


def test_softmax_with_two_units_scores_as_a_sigmoid_column():
    labels = np.array([0, 1, 1, 0, 1])
    p1 = np.array([0.2, 0.9, 0.6, 0.7, 0.4])
    as_sigmoid = classification_metrics(labels, class_probabilities(p1))
    as_softmax = classification_metrics(labels, np.stack([1 - p1, p1], axis=1))
    assert as_sigmoid == pytest.approx(as_softmax)


def test_auc_is_left_out_when_one_class_is_present():
    probs = class_probabilities(np.array([0.2, 0.7, 0.9]))
    assert "auc" not in classification_metrics(np.array([1, 1, 1]), probs)


def test_save_plots_draws_roc_only_for_two_classes(tmp_path):
    labels = np.array([0, 1, 2, 1])
    probs = np.eye(3)[[0, 1, 2, 2]] * 0.8 + 0.2 / 3
    assert [p.name for p in save_plots(labels, probs, ["a", "b", "c"], tmp_path)] == [
        "confusion_matrix.png"
    ]
    binary = save_plots(
        np.array([0, 1]), class_probabilities(np.array([0.3, 0.8])), ["n", "p"], tmp_path
    )
    assert [p.name for p in binary] == ["confusion_matrix.png", "roc_curve.png"]
    assert all(p.stat().st_size > 1000 for p in binary)
