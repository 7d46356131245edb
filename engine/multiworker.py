"""Training over several machines: TF_CONFIG, the chief, and the Keras patches it needs.

Every worker runs the same command with its own TF_CONFIG (TensorFlow's cluster
description: {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker",
"index": i}}) and the same MLFLOW_RUN_ID. Worker 0 is the chief: it logs the run's
parameters, metrics, plots and model and checkpoints to the run's folder; the others
log only their system metrics under their own node id (`worker-<i>`) and checkpoint to
a temporary folder. Each worker reads its own shard of the data: a streamed training
split only its own rows (engine.stream), the rest through tf.data's DATA auto-shard
policy; the global batch is batch_size x replicas; --learning-rate is the rate for
that global batch.

A worker that dies: the survivors' collectives fail through MultiWorkerMirroredStrategy's
peer health check (every 30 s, 3 tries of 10 s) or at the latest after the collective
timeout (COLLECTIVE_TIMEOUT_SECONDS, TensorFlow's own note is that without one the
others may wait forever), and the chief marks the run FAILED with its resume_command.
The run's status is the chief's to set: a worker that has trained waits for the chief
to end the run (at most TRAIN_CHIEF_WAIT seconds, default an hour) before it exits,
since `mlflow run` marks a run FINISHED when its own process ends.

Keras 3.15 `fit` does not run under MultiWorkerMirroredStrategy as shipped: make_strategy
patches it (engine.keras_patches).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import tensorflow as tf
from mlflow.entities import RunStatus
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from engine.config import UserError
from engine.keras_patches import is_per_worker, patch_keras

# Upper bound on one collective (an all-reduce waiting for a peer), in seconds. Generous,
# because a live chief may spend minutes at an epoch's end (checkpoint, MLflow retries)
# while the others wait; a dead peer is found sooner by the health check.
COLLECTIVE_TIMEOUT_SECONDS = int(os.environ.get("TRAIN_COLLECTIVE_TIMEOUT", "600"))
NODE_ID_VARIABLE = "MLFLOW_SYSTEM_METRICS_NODE_ID"  # read by MLflow's system metrics
# How long a worker that has trained waits for the chief to end the run (evaluate, log and
# register the model), in seconds: see wait_for_chief.
CHIEF_WAIT_VARIABLE = "TRAIN_CHIEF_WAIT"
CHIEF_WAIT_SECONDS = float(os.environ.get(CHIEF_WAIT_VARIABLE, "3600"))


@dataclass(frozen=True)
class Cluster:
    """The workers TF_CONFIG names and which one this process is."""

    workers: list[str]
    index: int

    @property
    def chief(self) -> bool:
        """Worker 0 logs and registers; the others only train."""
        return self.index == 0

    @property
    def node_id(self) -> str:
        """This worker's node id in the run's system metrics."""
        return f"worker-{self.index}"


def cluster_from_env(environ: dict[str, str] | None = None) -> Cluster | None:
    """TF_CONFIG read and checked (made first in a pod of an Indexed Job); None when it
    is unset or empty.

    Raises:
        UserError: TF_CONFIG is not JSON, names no workers, or its task index is out of range.
    """
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG", "").strip()
    if not text and (text := indexed_job_tf_config(environ)):
        environ["TF_CONFIG"] = text  # what TensorFlow's cluster resolver reads
    if not text:
        return None
    hint = (
        'TF_CONFIG must be JSON like {"cluster": {"worker": ["host0:port", "host1:port"]}, '
        '"task": {"type": "worker", "index": 0}}'
    )
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"TF_CONFIG is not JSON ({err}); {hint}. Nothing was trained.") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    workers = cluster.get("worker") if isinstance(cluster, dict) else None
    if not isinstance(workers, list) or not workers:
        raise UserError(f"TF_CONFIG names no workers; {hint}. Nothing was trained.")
    task = config.get("task") or {}
    index = task.get("index", 0) if isinstance(task, dict) else None
    if task.get("type", "worker") != "worker" or not isinstance(index, int):
        raise UserError(f"TF_CONFIG's task must be a worker with an integer index; {hint}.")
    if not 0 <= index < len(workers):
        raise UserError(
            f"TF_CONFIG's task index {index} is out of range: it names {len(workers)} "
            f"worker(s), so the index must be 0 to {len(workers) - 1}. Nothing was trained."
        )
    return Cluster(workers=[str(w) for w in workers], index=index)


def indexed_job_tf_config(environ: dict[str, str]) -> str:
    """The entry step of a pod of a Kubernetes Indexed Job (rendered by host/kube.py):
    TF_CONFIG from the pod's JOB_COMPLETION_INDEX, its Job's name (JOB_NAME, from the
    pod's job-name label) and the TRAIN_WORKERS, TRAIN_WORKER_SUBDOMAIN (the headless
    Service) and TRAIN_WORKER_PORT the template sets. Pod i's host name is
    <job>-<i>.<subdomain>. "" outside such a pod.
    """
    names = ("TRAIN_WORKERS", "JOB_COMPLETION_INDEX", "JOB_NAME", "TRAIN_WORKER_SUBDOMAIN")
    if not all(environ.get(name) for name in names):
        return ""
    job, subdomain = environ["JOB_NAME"], environ["TRAIN_WORKER_SUBDOMAIN"]
    port = environ.get("TRAIN_WORKER_PORT", "2222")
    try:
        count, index = int(environ["TRAIN_WORKERS"]), int(environ["JOB_COMPLETION_INDEX"])
    except ValueError:
        raise UserError(
            f"TRAIN_WORKERS ({environ['TRAIN_WORKERS']}) and JOB_COMPLETION_INDEX "
            f"({environ['JOB_COMPLETION_INDEX']}) must be whole numbers. Nothing was trained."
        ) from None
    workers = [f"{job}-{i}.{subdomain}:{port}" for i in range(count)]
    config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
    return json.dumps(config)


def wanted_cluster(distribute: str) -> Cluster | None:
    """The cluster to train over: TF_CONFIG with more than one worker, or any TF_CONFIG
    with --distribute multiworker; None for training on this machine alone.

    Raises:
        UserError: --distribute multiworker without TF_CONFIG, or a bad TF_CONFIG.
    """
    cluster = cluster_from_env()
    if distribute == "multiworker" and cluster is None:
        raise UserError(
            "--distribute multiworker needs TF_CONFIG, the JSON that names every worker and "
            "this one's index (make kube-run WORKERS=N and make run WORKERS=N set it). "
            "Nothing was trained."
        )
    if cluster is None or (len(cluster.workers) == 1 and distribute != "multiworker"):
        return None
    return cluster


def make_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy with the collective timeout set, Keras patched."""
    patch_keras()
    options = tf.distribute.experimental.CommunicationOptions(
        timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS
    )
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def worker_share(distribute: str) -> tuple[int, int] | None:
    """(this worker's index, the workers) when training over several, else None: what
    a pipeline that reads only its own share (engine.stream) needs."""
    cluster = wanted_cluster(distribute)
    if cluster is None or len(cluster.workers) < 2:
        return None
    return cluster.index, len(cluster.workers)


def shard(ds: tf.data.Dataset, cluster: Cluster | None) -> tf.data.Dataset:
    """The dataset sharded by element across the cluster's workers (each keeps its 1/N,
    whatever the source: files or memory); unchanged off a cluster, or when it holds
    only this worker's share already (the streamed training split)."""
    if cluster is None or is_per_worker(ds):
        return ds
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def local_model(model: Any) -> Any:
    """The model detached from its strategy, to predict after training: under
    MultiWorkerMirroredStrategy predict gathers from every worker (the chief alone would
    wait for them), and under MirroredStrategy predict_on_batch runs the batch on every
    replica and returns it once per replica."""
    model._distribute_strategy = None
    model.predict_function = None
    return model


# ----------------------------------------------------------------------------
# The worker's part of the run
# ----------------------------------------------------------------------------


def join_cluster(distribute: str, resume_run_id: str) -> Cluster | None:
    """The cluster this process trains in (wanted_cluster), checked to share one MLflow run;
    the run's system metrics then carry this worker's node id.

    Raises:
        UserError: a bad TF_CONFIG, or several workers without one MLFLOW_RUN_ID.
    """
    cluster = wanted_cluster(distribute)
    if cluster is None:
        return None
    if not (os.environ.get("MLFLOW_RUN_ID") or resume_run_id):
        raise UserError(
            f"worker {cluster.index} of {len(cluster.workers)} has no MLFLOW_RUN_ID: every "
            "worker logs into one MLflow run, so create it first and give all of them its id "
            "(mlflow run and make kube-run do). Nothing was trained."
        )
    os.environ[NODE_ID_VARIABLE] = cluster.node_id
    print(f"worker {cluster.index} of {len(cluster.workers)}: {', '.join(cluster.workers)}")
    return cluster


def checkpoint_folder(root: Path, run_id: str, cluster: Cluster | None) -> Path:
    """The run's checkpoint folder on the chief (and off a cluster); a temporary one on
    the other workers, whose weights equal the chief's."""
    if cluster is None or cluster.chief:
        return root / run_id
    return Path(tempfile.mkdtemp(prefix=f"{run_id}-{cluster.node_id}-"))


@contextlib.contextmanager
def worker_run(resume_run_id: str, system_metrics: bool) -> Iterator[mlflow.entities.Run]:
    """A non-chief worker's part of the run: its system metrics, under its node id. The
    run's status is the chief's to set, so this neither starts nor ends the run; having
    trained, it waits for the chief to end it (wait_for_chief)."""
    run = mlflow.MlflowClient().get_run(resume_run_id or os.environ["MLFLOW_RUN_ID"])
    monitor = None
    if system_metrics:
        monitor = SystemMetricsMonitor(run.info.run_id, node_id=os.environ.get(NODE_ID_VARIABLE))
        monitor.start()
    try:
        yield run
        wait_for_chief(run.info.run_id)
    finally:
        if monitor is not None:
            monitor.finish()


def wait_for_chief(run_id: str, timeout: float = CHIEF_WAIT_SECONDS, poll: float = 2.0) -> bool:
    """Wait until the run is ended (the chief's end_run, or its launcher's), at most
    `timeout` seconds. A worker that has trained leaves only then: `mlflow run` (make run
    WORKERS=N) marks a run FINISHED when its own process ends and the run is not ended
    yet, which, from a non-chief's container, would end the run before the chief has
    evaluated and registered the model, or whatever became of the chief.

    Returns:
        True when the run ended in time; False (with a warning) when the wait ran out.
    """
    client = mlflow.MlflowClient()
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # a server that blinks: ask again
            status = client.get_run(run_id).info.status
            if RunStatus.is_terminated(RunStatus.from_string(status)):
                return True
        if time.monotonic() >= deadline:
            print(
                f"warning: the chief did not end run {run_id} within {timeout:.0f} s "
                f"({CHIEF_WAIT_VARIABLE}); this worker leaves it running",
                file=sys.stderr,
            )
            return False
        time.sleep(poll)
