"""Likely label errors: confident learning on out-of-sample class probabilities.

A run's validation and test predictions were made by a model that never trained on
those images, so where the model is confidently sure of another class than the one
an image is filed under, the label is the likely culprit. cleanlab's
`find_label_issues` (Northcutt et al., "Confident Learning", JAIR 2021) estimates
each class's confidence threshold and the noise rates from these probabilities and
returns the flagged images ranked by self-confidence (the probability of the given
class, lowest first). We use the library rather than our own copy: it is the
reference implementation, well kept, and needs only scikit-learn and pandas, which
MLflow brings already.

The list goes into the run's `data_check.json` under `likely_label_errors` (beside the
data check's own keys, which engine's data check fills before training), and its
length is the metric `data_likely_label_errors`. Nothing here may fail a run: data
too small for confident learning logs 0 with a note.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import mlflow
import numpy as np
from cleanlab.filter import find_label_issues

from engine.datacheck import ARTIFACT

KEYS = ("groups_across_splits", "label_conflicts", "near_duplicate_groups", "likely_label_errors")
METRIC = "data_likely_label_errors"
# Below this share of the way from the largest class's rate to perfect accuracy, a model's
# disagreements with the labels are its own errors, and nothing is listed.
CHANCE_MARGIN = 0.25


@dataclass
class Predictions:
    """Out-of-sample predictions of some images: labels, probabilities, where each came from."""

    labels: np.ndarray  # (N,) given class indices
    probs: np.ndarray  # (N, K) predicted class probabilities
    splits: list[str]  # each image's split (val, test, or a fold's name)
    paths: list[str | None] = field(default_factory=list)  # each image's file, None: unknown
    positions: list[int] = field(default_factory=list)  # each image's place in its split


def split_predictions(
    labels: np.ndarray, probs: np.ndarray, split: str, lineage: dict
) -> Predictions:
    """The predictions of one split in its pipeline's order, with each image's file.

    The files come from the run's lineage (a table of path, label and split, and the
    table rows of each split in its pipeline's order, `split_rows`); without them, or
    when the count disagrees (a multi-worker shard), the images are named by position.
    """
    count = len(labels)
    paths: list[str | None] = [None] * count
    table, rows = lineage.get("table"), (lineage.get("split_rows") or {}).get(split)
    if table is not None and rows is not None and len(rows) == count:
        paths = [table["path"][row] for row in rows]
    return Predictions(
        np.asarray(labels, dtype=int), np.asarray(probs), [split] * count, paths, list(range(count))
    )


def combine(parts: list[Predictions]) -> Predictions:
    """Several splits' predictions as one set (confident learning gains from more images)."""
    return Predictions(
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.probs for p in parts]),
        [s for p in parts for s in p.splits],
        [path for p in parts for path in p.paths],
        [at for p in parts for at in p.positions],
    )


def rank_label_errors(found: Predictions, class_names: list[str]) -> tuple[list[dict], str]:
    """The likely label errors among out-of-sample predictions, most likely first.

    Args:
        found: the predictions (labels, probabilities, splits, paths).
        class_names: the classes in label order.

    Returns:
        (entries, note): each entry has rank, path (None where unknown), split, position
        (in its split), given_class, suggested_class (the likeliest other class),
        self_confidence (the given class's probability) and suggested_probability; the
        note says why the list is empty when confident learning could not run.
    """
    labels, probs = found.labels, found.probs
    if len(labels) < 2 or len(np.unique(labels)) < 2:
        return [], f"too few images for confident learning ({len(labels)}, classes present < 2)"
    accuracy = float((probs.argmax(1) == labels).mean())
    largest = float(np.bincount(labels).max() / len(labels))
    if accuracy <= largest + CHANCE_MARGIN * (1 - largest):
        return [], (
            f"not listed: the model is barely better than always answering the largest class "
            f"on these images (accuracy {accuracy:.2f} against {largest:.2f}), so where it "
            "disagrees with a label says nothing about the label; train it further first"
        )
    try:
        with warnings.catch_warnings():  # "too few examples in class k" on small splits
            warnings.simplefilter("ignore")
            ranked = find_label_issues(
                labels, probs, return_indices_ranked_by="self_confidence", n_jobs=1
            )
    except Exception as err:  # a number of images cleanlab cannot work with: never a failed run
        return [], f"confident learning could not run: {err}"
    entries = []
    for rank, at in enumerate(np.asarray(ranked, dtype=int).tolist(), start=1):
        given = int(labels[at])
        others = probs[at].astype(float).copy()
        others[given] = -1.0
        suggested = int(others.argmax())
        entries.append(
            {
                "rank": rank,
                "path": found.paths[at] if found.paths else None,
                "split": found.splits[at],
                "position": found.positions[at] if found.positions else at,
                "given_class": class_names[given],
                "suggested_class": class_names[suggested],
                "self_confidence": round(float(probs[at, given]), 6),
                "suggested_probability": round(float(probs[at, suggested]), 6),
            }
        )
    return entries, ""


def log_label_errors(found: Predictions, class_names: list[str]) -> list[dict]:
    """Rank the likely label errors and log them into the active run's data_check.json.

    The data check logs data_check.json before training; this loads it, sets
    likely_label_errors and logs it again under the same name. A run without one gets
    a data_check.json of its own, the other keys empty. Logs the metric
    data_likely_label_errors and prints one line.

    Returns:
        The ranked entries.
    """
    entries, note = rank_label_errors(found, class_names)
    report = existing_report(mlflow.active_run().info.run_id)
    report["likely_label_errors"] = entries
    if note:
        report["likely_label_errors_note"] = note
    mlflow.log_dict(report, ARTIFACT)
    mlflow.log_metric(METRIC, len(entries))
    print(f"likely label errors: {len(entries)} (see {ARTIFACT}){f'; {note}' if note else ''}")
    return entries


def existing_report(run_id: str) -> dict:
    """The run's data_check.json when it has one, else one with every key empty."""
    report: dict = {key: [] for key in KEYS}
    names = {item.path for item in mlflow.MlflowClient().list_artifacts(run_id)}
    if ARTIFACT in names:
        try:
            report.update(mlflow.artifacts.load_dict(f"runs:/{run_id}/{ARTIFACT}"))
        except Exception as err:  # a damaged report: keep ours, say so, never fail the run
            print(f"warning: could not read the run's {ARTIFACT} ({err}); writing a new one")
    return report
