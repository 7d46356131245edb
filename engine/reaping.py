"""reap-runs: a run whose process died stays RUNNING in MLflow; mark it FAILED, say why.

A run counts as gone when its `process.host`/`process.pid` tags (engine.training sets
them) name a process on this machine that has exited, or when nothing (start, metric)
has happened in it for a while.
"""

from __future__ import annotations

import os
import socket
import time

import mlflow
from mlflow.entities import Run, ViewType

from engine import tracking
from engine.config import UserError


def _process_gone(tags: dict[str, str]) -> bool:
    """True when the run's tags name a process on this machine that no longer exists."""
    host, pid = tags.get("process.host"), (tags.get("process.pid") or "").strip()
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _running_runs(client: mlflow.MlflowClient, experiment_names: list[str] | None) -> list[Run]:
    """The RUNNING runs of the named experiments (of every active one when None)."""
    if experiment_names:
        experiments = [client.get_experiment_by_name(n) for n in experiment_names]
        missing = [n for n, e in zip(experiment_names, experiments, strict=True) if e is None]
        if missing:
            raise UserError(f"no experiment named {', '.join(missing)}")
    else:
        experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    ids = [e.experiment_id for e in experiments]
    return client.search_runs(ids, "attributes.status = 'RUNNING'", max_results=1000) if ids else []


def _why_dead(client: mlflow.MlflowClient, run: Run, stale_minutes: float) -> str | None:
    """Why the run counts as dead, or None while it may still be alive."""
    last = run.info.start_time or 0
    for key in run.data.metrics:
        history = client.get_metric_history(run.info.run_id, key)
        last = max([last, *(m.timestamp for m in history)])
    idle_minutes = (time.time() * 1000 - last) / 60_000
    if _process_gone(run.data.tags):
        return f"its process {run.data.tags['process.pid']} on this machine has exited"
    if idle_minutes >= stale_minutes:
        return f"nothing was logged to it for {idle_minutes:.0f} min (limit {stale_minutes:g})"
    return None


def reap_runs(
    experiment_names: list[str] | None = None, stale_minutes: float = 60, dry_run: bool = False
) -> list[str]:
    """Mark RUNNING runs whose process is gone as FAILED, and say why in a tag.

    A run counts as gone when its `process.host`/`process.pid` tags name a process on
    this machine that has exited, or when nothing (start, metric) has happened in it
    for `stale_minutes`.

    Returns:
        The ids of the runs marked (or, with dry_run, that would be).
    """
    tracking.configure_tracking()
    client = mlflow.MlflowClient()
    runs = _running_runs(client, experiment_names)
    reaped = []
    for run in runs:
        why = _why_dead(client, run, stale_minutes)
        if why is None:
            continue
        verb = "would mark" if dry_run else "marking"
        print(f"{verb} run {run.info.run_id} ({run.info.run_name}) FAILED: {why}")
        if not dry_run:
            client.set_tag(run.info.run_id, "failure_reason", f"reaped by lifecycle.py: {why}")
            client.set_terminated(run.info.run_id, "FAILED")
        reaped.append(run.info.run_id)
    if not reaped:
        print(f"no stale RUNNING runs ({len(runs)} running, all active)")
    return reaped
