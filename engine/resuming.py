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

from engine import checkpoints, multiworker, tracking
from engine.config import RunConfig, UserError

# The make target that starts a run's workers, by how MLflow Projects ran it (how_it_ran).
MAKE_TARGETS = {"docker": "run", "kubernetes": "kube-run"}


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


def resume_command(
    run_id: str, cfg: RunConfig, cluster: multiworker.Cluster | None = None, launcher: str = ""
) -> str:
    """The command that resumes run_id from its checkpoint.

    Args:
        cluster: the workers the run trained on. A run over several resumes on as many,
            all at once: the chief's checkpoint holds the weights of every one.
        launcher: how the workers were started: "docker" (make run WORKERS=N),
            "kubernetes" (make kube-run WORKERS=N), or "" (each its own train.py).
    """
    flags = f"--resume-run-id {run_id}"
    params = f"-P resume_run_id={run_id}"
    if cfg.checkpoint_dir:
        flags += f" --checkpoint-dir {cfg.checkpoint_dir}"
        params += f" -P checkpoint_dir={cfg.checkpoint_dir}"
    if cluster is None:
        return f"python train.py {flags}"
    workers = len(cluster.workers)
    if launcher in MAKE_TARGETS:
        return f'make {MAKE_TARGETS[launcher]} WORKERS={workers} ARGS="{params}"'
    return (
        f"python train.py {flags}  "
        f"# on each of the {workers} workers, with TF_CONFIG naming the same {workers}"
    )


def how_it_ran(run_id: str, ask_server: bool = True) -> tuple[multiworker.Cluster | None, str]:
    """The workers this process trains with and how they were started (resume_command's
    cluster and launcher), from TF_CONFIG, the Indexed Job's environment and the tags
    MLflow Projects put on the run (read only when ask_server)."""
    cluster = None
    with contextlib.suppress(Exception):  # TF_CONFIG was checked before the run began
        cluster = multiworker.cluster_from_env()
    if cluster is None or len(cluster.workers) < 2:
        return None, ""
    if os.environ.get("TRAIN_WORKERS"):  # set by the Indexed Job's template (host/kube.py)
        return cluster, "kubernetes"
    tags: dict[str, str] = {}
    if ask_server:
        with contextlib.suppress(Exception):  # the server may be what failed
            tags = mlflow.MlflowClient().get_run(run_id).data.tags
    if tags.get("mlflow.project.backend") == "kubernetes":
        return cluster, "kubernetes"
    return cluster, "docker" if tags.get("mlflow.project.env") == "docker" else ""


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
        f"run with: {resume_command(run_id, cfg, *how_it_ran(run_id, ask_server=False))}"
    )


def say_how_to_resume(run_id: str, cfg: RunConfig) -> None:
    """Tag the stopped run as resumable and print the command that resumes it."""
    cluster, launcher = how_it_ran(run_id)
    command = resume_command(run_id, cfg, cluster, launcher)
    with contextlib.suppress(Exception):  # the server may be what failed
        mlflow.set_tag("resume_command", command)
    where = ""
    if cluster is not None:
        where = f" on the same {len(cluster.workers)} workers, all at once,"
    print(
        f"\nrun {run_id} stopped after a checkpoint; resume it{where} with:\n  {command}",
        file=sys.stderr,
    )
