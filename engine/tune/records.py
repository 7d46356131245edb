"""A study's MLflow records: the parent run, trials a dead worker left running, the outcome
(metrics, best.* parameters and tags, plots) and the best trial's registered model."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState
from optuna.visualization import matplotlib as plots

from engine import tracking
from engine.tune.settings import TuneSettings, safe_url

PLOTS = {
    "optimization_history": plots.plot_optimization_history,
    "param_importances": plots.plot_param_importances,
    "intermediate_values": plots.plot_intermediate_values,
    "slice": plots.plot_slice,
}
# the parent run's trial counts, logged as metrics
COUNTED = {
    "trials_finished": TrialState.COMPLETE,
    "trials_pruned": TrialState.PRUNED,
    "trials_failed": TrialState.FAIL,
}


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(study: optuna.Study, requeue: bool = True) -> int:
    """Mark trials left RUNNING by a dead worker FAILED (their MLflow runs too) and, with
    requeue, queue each again with its parameters; returns how many."""
    storage = study._storage
    study_id = storage.get_study_id_from_name(study.study_name)
    client = mlflow.MlflowClient()
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get("worker", "")).partition(":")
        if host == socket.gethostname() and pid.isdigit() and pid_alive(int(pid)):
            continue  # another `make tune` on this machine is running it
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "tune.failed", "worker died; trial queued again")
            client.set_terminated(run_id, "FAILED")
        if requeue and trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        print(
            f"trial {trial.number} was left running by a stopped worker: marked FAILED"
            + (f" (run {run_id})" if run_id else "")
            + (", queued again" if requeue else "")
        )
        count += 1
    return count


def open_parent_run(study: optuna.Study, settings: TuneSettings, tracking_uri: str) -> str:
    """The study's parent run: the one it had (reopened), or a new one."""
    client = mlflow.MlflowClient()
    run_id = study.user_attrs.get("mlflow_parent_run_id", "")
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
            print(f"continuing study {settings.study_name}: parent run {run_id}")
            return run_id
        except MlflowException:
            print(f"parent run {run_id} is not in {tracking_uri}; starting a new one")
    experiment_name = settings.base["experiment_name"]
    tracking.set_experiment(experiment_name, tracking_uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    run = client.create_run(
        experiment.experiment_id,
        run_name=settings.study_name,
        tags={"tune.study": settings.study_name, "tune.role": "parent"},
    )
    run_id = run.info.run_id
    study.set_user_attr("mlflow_parent_run_id", run_id)
    searched = {p["name"] for p in settings.space}
    params = {k: v for k, v in settings.base.items() if k not in searched}
    params.update(
        {
            "tune.study_name": settings.study_name,
            "tune.storage": safe_url(settings.storage),
            "tune.metric": settings.metric,
            "tune.direction": settings.direction,
            "tune.pruner": settings.pruner,
            "tune.prune_after": settings.prune_after,
            "tune.space": json.dumps(settings.space),
        }
    )
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run_id


def save_plots(study: optuna.Study, folder: Path) -> list[str]:
    """Optuna's matplotlib plots of the study as PNGs in folder; returns the names written."""
    matplotlib.use("Agg")  # files only: a study has no screen
    written = []
    for name, plot in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks these plots experimental
                axes = plot(study)
        except Exception as err:  # e.g. importances need two finished trials
            print(f"  no {name} plot: {err}")
            continue
        figure = np.ravel(axes)[0].figure
        figure.savefig(folder / f"{name}.png", bbox_inches="tight")
        plt.close(figure)
        written.append(name)
    return written


def log_best(
    study: optuna.Study, best: FrozenTrial, settings: TuneSettings, step: int
) -> dict[str, Any]:
    """The best trial on the parent run (best_value at step, best.* tags and parameters),
    its model registered; returns the summary's best_* entries and model_version."""
    client = mlflow.MlflowClient()
    parent = settings.parent_run_id
    client.log_metric(parent, "best_value", best.value, step=step)
    best_tags = {f"best.{k}": str(v) for k, v in best.params.items()}
    best_tags.update(
        best_trial=str(best.number), best_run_id=best.user_attrs.get("mlflow_run_id", "")
    )
    client.log_batch(parent, tags=[RunTag(k, v) for k, v in best_tags.items()])
    logged = client.get_run(parent).data.params
    # a parameter cannot change: after a resume that found a better trial, the
    # best.* tags hold the current best
    new_params = [
        Param(f"best.{k}", str(v)) for k, v in best.params.items() if f"best.{k}" not in logged
    ]
    client.log_batch(parent, params=new_params)
    return {
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "best_run_id": best.user_attrs.get("mlflow_run_id"),
        "model_version": register_best(study, best, settings),
    }


def finish(study: optuna.Study, settings: TuneSettings) -> dict[str, Any]:
    """Log the study's outcome on the parent run, register the best trial's model."""
    client = mlflow.MlflowClient()
    parent = settings.parent_run_id
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    for name, state in COUNTED.items():
        client.log_metric(parent, name, counts[state], step=len(trials))
    summary: dict[str, Any] = {
        "parent_run_id": parent,
        "trials": len(trials),
        "finished": counts[TrialState.COMPLETE],
        "pruned": counts[TrialState.PRUNED],
        "failed": counts[TrialState.FAIL],
    }
    if counts[TrialState.COMPLETE]:
        summary.update(log_best(study, study.best_trial, settings, step=len(trials)))
    with tempfile.TemporaryDirectory() as tmp:
        if save_plots(study, Path(tmp)):
            client.log_artifacts(parent, tmp, "plots")
    client.set_terminated(parent, "FINISHED")
    return summary


def register_best(study: optuna.Study, best: FrozenTrial, settings: TuneSettings) -> str | None:
    """Register the best trial's logged model and give it the alias (once per best trial)."""
    name, alias = settings.base["registered_model_name"], settings.base["model_alias"]
    model_uri = best.user_attrs.get("model_uri")
    if not name or not model_uri:
        return None
    registered = study.user_attrs.get("registered", {})
    if str(best.number) in registered:
        return registered[str(best.number)]
    print(f"registering trial {best.number}'s model as {name} ...")
    version = mlflow.register_model(model_uri, name).version
    client = mlflow.MlflowClient()
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
    run_id = best.user_attrs.get("mlflow_run_id")
    if run_id:
        client.set_tag(run_id, "tune.registered_version", str(version))
    study.set_user_attr("registered", {**registered, str(best.number): str(version)})
    return str(version)
