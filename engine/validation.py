"""validate: score a registered version on held-out data, compare it with the champion on
the same images, record the decision in a run, and move the champion alias.

The fork's data comes in as arguments, its Config (data_cfg) and its load_data, so the
engine never imports train.py.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import tensorflow as tf
from mlflow.exceptions import MlflowException

from engine import data_overlap, evaluation, reproduction_verdict, tracking
from engine.config import UserError
from engine.network import class_probabilities
from engine.registry import (
    DEFAULT_MODEL_NAME,
    ModelRef,
    ModelSpec,
    load_model,
    model_spec,
    resolve_model,
)

# Metrics where a smaller value is the better one.
LOWER_IS_BETTER = ("loss",)
# load_data(cfg) -> (train_ds, val_ds, info): the fork's hook (see train.py)
LoadData = Callable[[Any], tuple]


def is_better(candidate: float, champion: float, metric: str, min_delta: float = 0.0) -> bool:
    """Whether the candidate's score beats the champion's by more than min_delta."""
    if metric in LOWER_IS_BETTER:
        return candidate < champion - min_delta
    return candidate > champion + min_delta


@dataclass
class Evaluation:
    """One version's answers on the held-out images, and its scores."""

    ref: ModelRef
    spec: ModelSpec
    labels: np.ndarray
    probs: np.ndarray
    metrics: dict[str, float]


@dataclass
class ValidationResult:
    """What validate decided, on which scores, and the run that records it."""

    run_id: str
    candidate: Evaluation
    champion: Evaluation | None
    promoted: bool
    reason: str
    overlap: data_overlap.Overlap | None = None  # evaluated images the model trained on


def _require_same_classes(ref: ModelRef, spec: ModelSpec, class_names: list[str]) -> None:
    if list(class_names) != list(spec.class_names):
        raise UserError(
            f"the data's classes {list(class_names)} differ from the classes {ref} was "
            f"trained on {spec.class_names}; evaluate it on data with the same classes"
        )


def _held_out(
    ref: ModelRef, spec: ModelSpec, cfg: Any, load_data: LoadData, split: str
) -> tuple[np.ndarray, np.ndarray, list[str], dict]:
    """The split's images (whole pixel values), labels, the data's class names and lineage."""
    print(
        f"loading data ({cfg.data_source}, {split} split, {cfg.image_size}px x {cfg.channels}) ..."
    )
    train_ds, val_ds, info = load_data(cfg)
    _require_same_classes(ref, spec, info.class_names)
    ds = {"test": info.test_ds, "validation": val_ds}.get(split, val_ds.concatenate(train_ds))
    if split == "all" and info.test_ds is not None:
        ds = ds.concatenate(info.test_ds)
    if ds is None:
        raise UserError(
            f"the data has no test split ({cfg.data_source}, test_split {cfg.test_split}): "
            "give --test-split above 0 (the value training used), or decide on "
            "--split validation, knowing training chose its best epoch on it"
        )
    images, labels = [], []
    for x, y in ds.as_numpy_iterator():
        images.append(x.astype(np.uint8))  # whole pixel values: a quarter of float32's memory
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels), info.class_names, info.lineage


def evaluate(
    ref: ModelRef, data_cfg: Any, load_data: LoadData, split: str, data_cache: dict
) -> Evaluation:
    """Predict the chosen split of the data with one model version and score it.

    Args:
        ref: the version.
        data_cfg: the fork's Config that selects the data; image size and channels
            are taken from the model.
        load_data: the fork's load_data(cfg).
        split: test, validation or all (see validate).
        data_cache: the images loaded so far, by (image size, channels), so the
            champion, which usually shares the candidate's input shape, reuses them.
    """
    spec = model_spec(ref.uri)
    cfg = dataclasses.replace(data_cfg, image_size=spec.image_size, channels=spec.channels)
    key = (spec.image_size, spec.channels)
    if key not in data_cache:
        data_cache[key] = _held_out(ref, spec, cfg, load_data, split)
    else:  # the data another version was scored on: the same classes?
        _require_same_classes(ref, spec, data_cache[key][2])
    images, labels = data_cache[key][:2]
    batches = tf.data.Dataset.from_tensor_slices(images).batch(data_cfg.batch_size)
    batches = batches.map(lambda x: tf.cast(x, tf.float32))
    probs = class_probabilities(load_model(ref.uri).predict(batches, verbose=0))
    return Evaluation(ref, spec, labels, probs, evaluation.classification_metrics(labels, probs))


def _candidate_and_champion(
    model: str, model_name: str, champion_alias: str
) -> tuple[ModelRef, ModelRef | None]:
    """The registered version to validate, and the one `champion_alias` marks (if any)."""
    candidate = resolve_model(model, model_name)
    if candidate.name is None:
        raise UserError(
            f"validate needs a registered model version, not {model}: "
            "give models:/NAME@ALIAS, models:/NAME/VERSION or a version number"
        )
    try:
        version = mlflow.MlflowClient().get_model_version_by_alias(candidate.name, champion_alias)
        champion = resolve_model(f"models:/{candidate.name}/{version.version}", model_name)
    except MlflowException:
        champion = None
    return candidate, champion


@dataclass
class Policy:
    """How validate decides: on which split and metric, against which alias, by how much."""

    split: str = "test"
    metric: str = "auc"
    champion_alias: str = "champion"
    min_delta: float = 0.0
    experiment_name: str = "model-validation"


def decide(
    candidate: Evaluation,
    champion: Evaluation | None,
    champion_ref: ModelRef | None,
    policy: Policy,
) -> tuple[bool, str]:
    """Whether the candidate takes the champion alias, and the sentence that says why.

    Args:
        champion: the champion's scores; None when there is none, or when the
            candidate already is it (then champion_ref is the candidate's version).
    """
    metric, alias, min_delta = policy.metric, policy.champion_alias, policy.min_delta
    score = candidate.metrics[metric]
    images = len(candidate.labels)
    if champion_ref is None:
        return True, (
            f"there is no '{alias}' yet, so {candidate.ref} becomes it "
            f"({metric} {score:.4f} on {images} {policy.split}-split images)"
        )
    if champion is None:
        return False, f"{candidate.ref} already is the '{alias}'"
    best = champion.metrics[metric]
    promoted = is_better(score, best, metric, min_delta)
    direction = "lower" if metric in LOWER_IS_BETTER else "higher"
    verdict = "beats" if promoted else "does not beat"
    return promoted, (
        f"{candidate.ref} {verdict} the '{alias}' {champion_ref}: {metric} "
        f"{score:.4f} vs {best:.4f} on the same {images} {policy.split}-split images "
        f"({direction} is better" + (f", by more than {min_delta}" if min_delta else "") + ")"
    )


def _log_validation(
    candidate: Evaluation,
    champion: Evaluation | None,
    champion_ref: ModelRef | None,
    data_cfg: Any,
    policy: Policy,
    promoted: bool,
    reason: str,
) -> str:
    """Log the validation run; tag the candidate version with its score. Returns the run id."""
    ref, metric = candidate.ref, policy.metric
    mlflow.set_experiment(policy.experiment_name)
    with mlflow.start_run(run_name=f"validate-{ref.name}-v{ref.version}") as run:
        decision = "promoted" if promoted else "kept"
        mlflow.set_tags(
            {"model_name": ref.name, "model_version": ref.version, "decision": decision}
        )
        mlflow.log_params(
            {
                "model_uri": ref.uri,
                "training_run_id": ref.run_id,
                "champion_alias": policy.champion_alias,
                "champion_version": champion_ref.version if champion_ref else "none",
                "metric": metric,
                "min_delta": policy.min_delta,
                "split": policy.split,
                "images": len(candidate.labels),
                "data_source": data_cfg.data_source,
                "data_dir": data_cfg.data_dir,
                "seed": data_cfg.seed,
                "val_split": data_cfg.val_split,
                "test_split": data_cfg.test_split,
            }
        )
        mlflow.log_metrics(candidate.metrics)
        if champion is not None:
            mlflow.log_metrics({f"champion_{k}": v for k, v in champion.metrics.items()})
        _log_plots(candidate)
        mlflow.log_text(reason + "\n", "decision.txt")
        client = mlflow.MlflowClient()
        score = f"{candidate.metrics[metric]:.6f}"
        client.set_model_version_tag(ref.name, ref.version, f"validation_{metric}", score)
        client.set_model_version_tag(ref.name, ref.version, "validation_run_id", run.info.run_id)
    return run.info.run_id


def _log_plots(scored: Evaluation) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        evaluation.save_plots(scored.labels, scored.probs, scored.spec.class_names, Path(tmp))
        mlflow.log_artifacts(tmp, "plots")


def _training_overlap(
    candidate: Evaluation, data_cfg: Any, load_data: LoadData, split: str, data_cache: dict
) -> data_overlap.Overlap | None:
    """The evaluated images the candidate's training run trained on (see engine.data_overlap)."""
    lineage = data_cache[(candidate.spec.image_size, candidate.spec.channels)][3]
    return data_overlap.training_overlap(candidate.ref.run_id, data_cfg, load_data, lineage, split)


def _score_both(candidate_ref, champion_ref, metric, data_cfg, load_data, split, data_cache):
    """(the candidate's Scored, the champion's or None) on the same data; an unknown
    metric stops after the candidate's."""
    candidate = evaluate(candidate_ref, data_cfg, load_data, split, data_cache)
    if metric not in candidate.metrics:
        raise UserError(
            f"metric '{metric}' is not computed here; choose one of {sorted(candidate.metrics)}"
        )
    champion = None
    if champion_ref is not None and champion_ref.version != candidate_ref.version:
        champion = evaluate(champion_ref, data_cfg, load_data, split, data_cache)
    return candidate, champion


def validate(
    model: str,
    data_cfg: Any,
    load_data: LoadData,
    split: str = "test",
    metric: str = "auc",
    champion_alias: str = "champion",
    min_delta: float = 0.0,
    experiment_name: str = "model-validation",
    model_name: str = DEFAULT_MODEL_NAME,
    promote: bool = True,
    require_reproduced: bool = False,
) -> ValidationResult:
    """Evaluate a registered version and the current champion on the same held-out data.

    Logs the candidate's metrics (and the champion's, prefixed champion_), a confusion
    matrix, a ROC curve for two classes and the decision to a new run; tags the model
    version with the result; moves `champion_alias` to the candidate when there is no
    champion or the candidate scores better on `metric` (lower for loss). Warns when the
    evaluated images were the model's training images (engine.data_overlap).

    Args:
        model: the candidate (see registry.resolve_model).
        data_cfg: the fork's Config that selects the data (data_source, data_dir, seed, ...).
        load_data: the fork's load_data(cfg) -> (train_ds, val_ds, info).
        split: "test" (the split load_data makes with this seed and test_split, which
            no choice in training was made on), "validation" (the one training picked
            its best epoch on: an optimistic score) or "all" (every image of the
            source: for a separate test set).
        metric: accuracy, auc, loss, precision, recall or f1.
        champion_alias: the alias that marks the model in production.
        min_delta: the candidate must beat the champion by more than this.
        experiment_name: where the validation run goes.
        model_name: the registered model a bare alias or version refers to.
        promote: False only reports what it would decide.
        require_reproduced: refuse a candidate that `make reproduce` did not reproduce.
    """
    policy = Policy(split, metric, champion_alias, min_delta, experiment_name)
    tracking.configure_tracking()
    candidate_ref, champion_ref = _candidate_and_champion(model, model_name, champion_alias)
    if require_reproduced:
        reproduction_verdict.check_reproduced(candidate_ref.name, candidate_ref.version)
    data_cache: dict = {}
    candidate, champion = _score_both(
        candidate_ref, champion_ref, metric, data_cfg, load_data, split, data_cache
    )
    overlap = _training_overlap(candidate, data_cfg, load_data, split, data_cache)
    promoted, reason = decide(candidate, champion, champion_ref, policy)
    if not promote and promoted:
        reason += "; --no-promote: the alias stays where it is"
    promoted = promoted and promote
    run_id = _log_validation(candidate, champion, champion_ref, data_cfg, policy, promoted, reason)
    data_overlap.say_and_record(overlap, run_id)
    if promoted:
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(candidate_ref.name, champion_alias, candidate_ref.version)
    return ValidationResult(run_id, candidate, champion, promoted, reason, overlap)


def report(result: ValidationResult) -> None:
    """Print the scores, the decision and the validation run (`lifecycle.py validate`)."""
    for label, scored in (("", result.candidate), ("champion ", result.champion)):
        if scored is not None:
            scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted(scored.metrics.items()))
            print(f"{label}{scored.ref}: {scores}")
    print(("PROMOTED: " if result.promoted else "KEPT: ") + result.reason)
    print(f"validation run: {result.run_id}")
