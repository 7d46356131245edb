"""A study's coordinator: the checks before any trial, the parent run, the workers, and
the outcome printed at the end (or the command that continues a stopped study)."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
from optuna.trial import TrialState

from engine import tracking
from engine.cli import exit_on_sigterm
from engine.config import UserError
from engine.training import check_data
from engine.tune.launch import LocalWorkers, start_workers, wait_for
from engine.tune.records import finish, open_parent_run, recover_dead_trials
from engine.tune.settings import Launcher, TuneSettings, load_hooks, safe_url
from engine.tune.space import Param
from engine.tune.study import make_study


def check_data_once(settings: TuneSettings) -> None:
    """Load the data once before the workers start: bad data stops the study before any
    trial, and data made on first use (the demo images) is not made by two workers at once.
    """
    config_cls, load_data, _ = load_hooks(settings.hooks)
    print("checking the data ...")
    _, _, info = check_data(load_data(config_cls(**settings.base)))
    print(
        f"  {info.train_count} training / {info.val_count} validation images, "
        f"classes {info.class_names}"
    )


def open_study(
    settings: TuneSettings, launcher: Launcher | None
) -> tuple[optuna.Study, Launcher, str]:
    """Check what the workers need and open the study; no run exists yet.

    Args:
        launcher: how workers start; None for LocalWorkers.

    Returns:
        (the study, the launcher, the tracking URI).

    Raises:
        UserError: the tracking store, the launcher's check, the data, or a study
            that already optimises the other way.
    """
    tracking_uri = tracking.configure_tracking()
    if launcher is None:
        hooks_dir = Path(importlib.import_module(settings.hooks).__file__).resolve().parent
        launcher = LocalWorkers(hooks_dir)
    launcher.check(settings)
    if getattr(launcher, "data_here", True):  # make kube-tune's data is on the cluster
        check_data_once(settings)
    study = make_study(settings)
    if study.direction.name.lower() != settings.direction:
        raise UserError(
            f"study {settings.study_name} {study.direction.name.lower()}s; it cannot "
            f"{settings.direction} now. Pick another --study-name or --direction."
        )
    return study, launcher, tracking_uri


def run_study(
    study: optuna.Study,
    settings: TuneSettings,
    launcher: Launcher,
    workers: int,
    trials: int,
    tracking_uri: str,
) -> int:
    """Run `trials` more trials on `workers` workers under the study's parent run.

    Returns:
        0 when every worker ended well, 1 when one failed, 130 or 128 + signal when
        Ctrl-C or SIGTERM stopped the study.
    """
    recover_dead_trials(study)
    settings.parent_run_id = open_parent_run(study, settings, tracking_uri)
    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    settings.stop_at = len(study.get_trials(deepcopy=False)) - waiting + trials
    print(
        f"study {settings.study_name} ({safe_url(settings.storage)}): {trials} trial(s), "
        f"{workers} worker(s), {settings.direction} {settings.metric}; parent run "
        f"{settings.parent_run_id}"
    )
    for param in settings.space:
        print(f"  {Param(**param).describe()}")
    started = time.time()
    # SIGTERM (kill, a scheduler) stops the workers as Ctrl-C does
    exit_on_sigterm()
    try:
        status = wait_for(start_workers(launcher, settings, workers))
    except (KeyboardInterrupt, SystemExit) as stop:
        return stopped(study, settings, stop)
    print_outcome(finish(study, settings), settings, time.time() - started)
    return 0 if status == 0 else 1


def stopped(study: optuna.Study, settings: TuneSettings, stop: BaseException) -> int:
    """Close a study Ctrl-C or SIGTERM stopped; returns the exit status (130, 128 + signal)."""
    # the workers are gone now: a trial one could not close (stopped mid-call, or
    # killed after a minute) is failed here, as its worker would have, not left RUNNING
    recover_dead_trials(study, requeue=False)
    mlflow.MlflowClient().set_terminated(settings.parent_run_id, "KILLED")
    storage = f" --storage {safe_url(settings.storage)}" if "://" in settings.storage else ""
    print(
        "\nstopped; the running trials are marked FAILED. Continue the study with "
        f"--study-name {settings.study_name}{storage}",
        file=sys.stderr,
    )
    return stop.code if isinstance(stop, SystemExit) and stop.code else 130


def print_outcome(summary: dict[str, Any], settings: TuneSettings, seconds: float) -> None:
    """The study's outcome: trial counts, the best trial, its model, the parent run."""
    print(
        f"\ndone in {seconds:.0f} s: {summary['trials']} trial(s) in the study, "
        f"{summary['finished']} finished, {summary['pruned']} pruned, "
        f"{summary['failed']} failed"
    )
    if "best_value" in summary:
        print(
            f"best trial {summary['best_trial']}: {settings.metric} "
            f"{summary['best_value']:.4f} {summary['best_params']} "
            f"(run {summary['best_run_id']})"
        )
    if summary.get("model_version"):
        print(
            f"registered model: {settings.base['registered_model_name']} version "
            f"{summary['model_version']} (alias {settings.base['model_alias']})"
        )
    print(
        f"parent run: {settings.parent_run_id}; continue this study with "
        f"--study-name {settings.study_name}"
    )
