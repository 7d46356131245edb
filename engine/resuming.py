"""Resuming a crashed run: its own config, its MLflow run reopened, the epochs it had
not logged, and the command a stopped run prints so that a person can resume it.

The weights and the training state come from engine.checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

import mlflow
from mlflow.exceptions import MlflowException

from engine import checkpoints, tracking
from engine.config import RunConfig, UserError


def resumed_config(cfg: RunConfig, state: checkpoints.TrainingState) -> RunConfig:
    """The crashed run's own config; only where checkpoints go and whether they stay is new."""
    names = {f.name for f in dataclasses.fields(cfg)}
    saved = {k: v for k, v in state.config.items() if k in names}
    keep = ("resume_run_id", "checkpoint_dir", "keep_checkpoints")
    return dataclasses.replace(cfg, **{**saved, **{k: getattr(cfg, k) for k in keep}})


def open_resumed_run(run_id: str) -> mlflow.entities.Run:
    """The crashed run, checked to exist and not to have finished."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as err:
        raise UserError(f"run {run_id} is not in {mlflow.get_tracking_uri()}: {err}") from err
    if run.info.status == "FINISHED":
        raise UserError(f"run {run_id} has finished; there is nothing to resume")
    return run


def log_missing_epochs(run_id: str, state: checkpoints.TrainingState) -> int:
    """Log the checkpointed epochs' metrics that the run lacks (a crash between the
    checkpoint and the log); returns how many epochs needed it."""
    client = mlflow.MlflowClient()
    missing: dict[int, dict[str, float]] = {}
    for name, values in state.history.items():
        logged = {m.step for m in client.get_metric_history(run_id, name)}
        for step, value in enumerate(values, start=1):  # steps count epochs from 1
            if step not in logged:
                missing.setdefault(step, {})[name] = value
    for step, metrics in sorted(missing.items()):
        mlflow.log_metrics(metrics, step=step)
    return len(missing)


def resume_command(run_id: str, cfg: RunConfig) -> str:
    """The command that resumes run_id from its checkpoint."""
    command = f"python train.py --resume-run-id {run_id}"
    if cfg.checkpoint_dir:
        command += f" --checkpoint-dir {cfg.checkpoint_dir}"
    return command


def tracking_lost(
    err: Exception, uri: str, run_id: str, cfg: RunConfig
) -> tracking.TrackingLost | None:
    """One paragraph for a run whose tracking server stopped answering; None when err is
    something else. Nothing was registered: the model is logged after the last epoch's
    metrics reach the server."""
    reason = tracking.server_unreachable(err)
    if not reason or not run_id:
        return None
    budget = ", ".join(f"{k}={os.environ.get(k, v)}" for k, v in tracking.HTTP_RETRY_BUDGET.items())
    return tracking.TrackingLost(
        f"the tracking server at {uri} stopped answering during run {run_id} ({reason}); "
        f"MLflow retried within its budget ({budget}). Nothing was registered. The server "
        "could not be told, so the run shows RUNNING there until `make reap-runs` marks it "
        "FAILED. Its checkpoint is kept: once the server is back, resume it into the same "
        f"run with: {resume_command(run_id, cfg)}"
    )


def say_how_to_resume(run_id: str, cfg: RunConfig) -> None:
    """Tag the stopped run as resumable and print the command that resumes it."""
    command = resume_command(run_id, cfg)
    with contextlib.suppress(Exception):  # the server may be what failed
        mlflow.set_tag("resume_command", command)
    print(
        f"\nrun {run_id} stopped after a checkpoint; resume it with:\n  {command}",
        file=sys.stderr,
    )
