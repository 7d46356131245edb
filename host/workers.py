"""`make run WORKERS=N`: one run trained by N containers on this Docker host.

The run is created first; the launcher then starts N `mlflow run --run-id ID` at once,
one per slot, each container with its own TF_CONFIG (`-A e=TF_CONFIG=...`), so the
engine trains with MultiWorkerMirroredStrategy and worker 0 logs the run (see
engine.multiworker). On the host network (the default with a tracking server on this
host's loopback) the workers listen on free ports of 127.0.0.1; otherwise they sit on
one user-defined Docker network, DOCKER_WORKER_NETWORK (default mlflow-workers), and
reach each other by container name. The run's status is the chief's outcome: each
worker's `mlflow run` marks the run when it ends, so once all have ended the launcher
sets it from worker 0's exit (settle_status), and so does `make run`'s exit status.
"""

from __future__ import annotations

import json
import re
import shlex
import socket
import subprocess
from collections.abc import Callable, Mapping
from typing import TextIO

from engine.config import UserError
from host.launch import Job
from host.plan import Plan

WORKER_PORT = 2222  # on a Docker network each container has its own address
NETWORK = "mlflow-workers"


def workers_setting(value: str | None) -> int:
    """WORKERS, how many containers train the run together: a positive whole number, 1 if unset."""
    value = (value or "1").strip()
    if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
        raise UserError(f"WORKERS must be a positive whole number, got '{value}'")
    return int(value)


def free_ports(count: int) -> list[int]:
    """count TCP ports free on 127.0.0.1 now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(workers: list[str], index: int) -> str:
    """TensorFlow's cluster description for worker `index` of `workers` (host:port each)."""
    config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    return json.dumps(config, separators=(",", ":"))


def worker_docker_args(plan: Plan, run_id: str, count: int, network: str) -> list[dict[str, str]]:
    """Each worker container's docker args over the plan's: its TF_CONFIG, and on a
    Docker network its name and the network."""
    if plan.docker_args.get("network") == "host":
        hosts = [f"127.0.0.1:{port}" for port in free_ports(count)]
        extra: list[dict[str, str]] = [{} for _ in range(count)]
    else:
        names = [f"{run_id[:12]}-worker-{i}" for i in range(count)]
        hosts = [f"{name}:{WORKER_PORT}" for name in names]
        extra = [{"name": name, "network": network} for name in names]
    # shell-quoted: `mlflow run` joins the docker command into one line that bash runs
    quoted = [shlex.quote(f"TF_CONFIG={tf_config(hosts, i)}") for i in range(count)]
    return [{"e": quoted[i], **extra[i]} for i in range(count)]


def ensure_network(name: str) -> None:
    """Create the user-defined Docker network unless it exists."""
    found = subprocess.run(
        ["docker", "network", "inspect", name], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        subprocess.run(["docker", "network", "create", name], capture_output=True, check=True)


def worker_jobs(run_id: str, count: int) -> list[Job]:
    """One job per worker, all into the one run; worker 0 first."""
    return [Job(run_id=run_id, label=f"[worker {i}] ") for i in range(count)]


def outcome(jobs: list[Job]) -> Job:
    """The job that says how the run went: the chief's (worker 0). A worker that fails
    while training fails the chief's collectives too; one that fails after the chief has
    registered the model does not undo it."""
    return jobs[0]


def settle_status(tracking_uri: str, run_id: str, chief: Job, out: TextIO) -> str:
    """Make the run's status the chief's outcome once every container has ended:
    FINISHED when the chief's exited 0, else FAILED. Each worker's `mlflow run` marks
    the run when its own process ends, if no one has yet (the workers wait for the
    chief to end it, engine.multiworker.wait_for_chief, but a chief killed outright, an
    OOM kill, ends nothing itself).

    Returns:
        The run's status now.
    """
    from mlflow import MlflowClient  # seconds to import: only once the run has ended

    client = MlflowClient(tracking_uri)
    wanted = "FINISHED" if chief.exit_code == 0 else "FAILED"
    found = client.get_run(run_id).info.status
    if found != wanted:
        client.set_terminated(run_id, wanted)
        print(f"run {run_id} was {found}; its chief (worker 0) says {wanted}", file=out)
    return wanted


def slot_args(per_worker: list[dict[str, str]]) -> Callable[[int], Mapping[str, str]]:
    """The launcher's slot_docker_args: slot i is worker i."""

    def args(slot: int) -> Mapping[str, str]:
        return per_worker[slot]

    return args
