"""Training over several workers (MultiWorkerMirroredStrategy): TF_CONFIG, the errors
before a run, the Keras patches still being needed, two worker processes on 127.0.0.1
training into one MLflow run, a worker killed mid-run, and MirroredStrategy over two
logical CPUs."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

import train
from engine import multiworker, resuming
from engine.config import UserError
from engine.sources import make_demo_data
from engine.stream import SplitRows
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def tf_config(workers: list[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


# ---------------------------------------------------------------- fast


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{not json", "TF_CONFIG is not JSON"),
        ('{"cluster": {}}', "names no workers"),
        ('{"cluster": {"worker": []}, "task": {"index": 0}}', "names no workers"),
        (tf_config(["a:1", "b:2"], 2), "index 2 is out of range"),
        (tf_config(["a:1"], -1), "out of range"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "a worker"),
    ],
)
def test_bad_tf_config_is_one_paragraph(text, says):
    with pytest.raises(UserError, match=says) as err:
        multiworker.cluster_from_env({"TF_CONFIG": text})
    assert "\n" not in str(err.value)


def test_cluster_from_tf_config(monkeypatch):
    assert multiworker.cluster_from_env({}) is None
    cluster = multiworker.cluster_from_env({"TF_CONFIG": tf_config(["a:1", "b:2", "c:3"], 2)})
    assert (cluster.workers, cluster.index, cluster.chief) == (["a:1", "b:2", "c:3"], 2, False)
    assert cluster.node_id == "worker-2"
    # one worker is training on this machine unless multiworker is asked for
    monkeypatch.setenv("TF_CONFIG", tf_config(["a:1"], 0))
    assert multiworker.wanted_cluster("true") is None
    assert multiworker.wanted_cluster("multiworker").chief


def test_multiworker_without_tf_config_or_run_id(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="needs TF_CONFIG"):
        multiworker.wanted_cluster("multiworker")
    assert multiworker.wanted_cluster("true") is None
    monkeypatch.setenv("TF_CONFIG", tf_config(["a:1", "b:2"], 1))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with pytest.raises(UserError, match="has no MLFLOW_RUN_ID"):
        multiworker.join_cluster("true", "")


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (True, "true"),
        (False, "false"),
        ("yes", "true"),
        ("0", "false"),
        ("multiworker", "multiworker"),
    ],
)
def test_distribute_values(value, mode):
    assert tiny_config(distribute=value).distribute_mode() == mode


def test_bad_distribute_value():
    with pytest.raises(UserError, match="distribute must be true, false or multiworker"):
        tiny_config(distribute="sometimes").validate()


def test_a_worker_waits_for_the_chief_to_end_the_run(tracking_store, capsys):
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("wait")).info.run_id
    # nobody ends it: the wait runs out, with a warning, and the run stays RUNNING
    assert not multiworker.wait_for_chief(run_id, timeout=0.3, poll=0.1)
    assert "the chief did not end run" in capsys.readouterr().err
    assert client.get_run(run_id).info.status == "RUNNING"
    # the chief ends it a moment later: the worker leaves then, not before
    chief = threading.Timer(1.0, client.set_terminated, (run_id, "FAILED"))
    started = time.monotonic()
    chief.start()
    assert multiworker.wait_for_chief(run_id, timeout=60, poll=0.1)
    assert 0.9 < time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("environ", "tags", "expected"),
    [
        # each worker its own train.py: the same command on every one
        ({}, {}, "python train.py --resume-run-id {run} --checkpoint-dir /c  # on each of the 2"),
        # make run WORKERS=2: MLflow Projects ran it in Docker
        ({}, {"mlflow.project.env": "docker"}, 'make run WORKERS=2 ARGS="-P resume_run_id={run}'),
        # make kube-run WORKERS=2: the Indexed Job's environment says so, server or not
        ({"TRAIN_WORKERS": "2"}, {}, 'make kube-run WORKERS=2 ARGS="-P resume_run_id={run} -P'),
    ],
)
def test_resume_command_under_several_workers(
    tracking_store, monkeypatch, capsys, environ, tags, expected
):
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("resume"), tags=tags).info.run_id
    monkeypatch.setenv("TF_CONFIG", tf_config(["a:1", "b:2"], 0))
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    cfg = tiny_config(checkpoint_dir="/c")
    with mlflow.start_run(run_id=run_id):
        resuming.say_how_to_resume(run_id, cfg)
    tag = client.get_run(run_id).data.tags["resume_command"]
    assert tag.startswith(expected.format(run=run_id)), tag
    err = capsys.readouterr().err
    assert "resume it on the same 2 workers, all at once, with:" in err and tag in err
    # one worker: the command as before
    monkeypatch.delenv("TF_CONFIG")
    assert resuming.resume_command(run_id, cfg, *resuming.how_it_ran(run_id)) == (
        f"python train.py --resume-run-id {run_id} --checkpoint-dir /c"
    )


def streamed_training_split(demo_dir, cache_dir, monkeypatch, index: int):
    """Worker `index` of 2's streamed training pipeline (memory budget 0): its images and
    labels, and the pipeline."""
    monkeypatch.setenv("TF_CONFIG", tf_config(["a:1", "b:2"], index))
    cfg = tiny_config(
        data_source="imagedir", data_dir=str(demo_dir), cache_dir=str(cache_dir), batch_size=16
    )
    # the data check reads every image once (fingerprints) on a cold cache: off, so only
    # the training pipeline's reads are counted
    cfg = dataclasses.replace(cfg, data_check="off")
    train_ds, _, info = train.load_data(dataclasses.replace(cfg, memory_budget="0"))
    assert info.pipeline_params["data_pipeline"] == "stream"
    images = np.concatenate([x.numpy() for x, _ in train_ds])
    return images, train_ds, info


def test_each_streamed_worker_reads_only_its_share(demo_dir, tmp_path, monkeypatch):
    """Under two workers the streamed training split of each holds only its half, in
    batches of half the global batch; no auto-shard then reads and drops the rest."""
    read = {}
    original = SplitRows.read

    def counting(self, positions):
        read[index] = read.get(index, 0) + len(positions)
        return original(self, positions)

    monkeypatch.setattr(SplitRows, "read", counting)
    shares = []
    for index in (0, 1):
        images, train_ds, info = streamed_training_split(demo_dir, tmp_path, monkeypatch, index)
        shares.append({image.tobytes() for image in images})
        assert len(images) == info.train_count // 2 and read[index] == len(images)
        assert max(len(y) for _, y in train_ds) == 8  # half the global batch of 16
        assert multiworker.shard(train_ds, multiworker.cluster_from_env()) is train_ds
    assert not shares[0] & shares[1]  # two halves of one split
    monkeypatch.delenv("TF_CONFIG")
    train_ds, _, info = train.load_data(
        tiny_config(
            data_source="imagedir",
            data_dir=str(demo_dir),
            cache_dir=str(tmp_path),
            memory_budget="0",
        )
    )
    whole = {image.tobytes() for x, _ in train_ds for image in x.numpy()}
    assert shares[0] | shares[1] <= whole and len(whole) - len(shares[0] | shares[1]) < 2


# ---------------------------------------------------------------- slow: processes


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# Plain Keras fit under MultiWorkerMirroredStrategy, patched or not (argv[3]).
KERAS_FIT = """
import sys
import numpy as np, tensorflow as tf, keras
from engine import multiworker
if sys.argv[1] == "patched":
    multiworker.patch_keras()
strategy = tf.distribute.MultiWorkerMirroredStrategy()
x = np.random.RandomState(0).rand(32, 4).astype("float32")
ds = tf.data.Dataset.from_tensor_slices((x, (x.sum(1) > 2).astype("int32"))).batch(8)
with strategy.scope():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
model.fit(ds, epochs=1, verbose=0)
print("FIT-OK", float(sum(w.sum() for w in model.get_weights())))
"""

# One worker of an engine run; argv: a file for its final weights' checksum, the
# config's overrides as JSON, and the epoch after which it kills itself (0: never).
ENGINE_WORKER = """
import hashlib, json, os, signal, sys
import keras, numpy as np
import train
from engine.training import run_training
import train
from tests.conftest import tiny_config

class Watch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)
    def on_train_end(self, logs=None):
        # the trained weights; batch norm's moving statistics are each worker's own
        weights = np.concatenate([np.ravel(w.numpy()) for w in self.model.trainable_weights])
        open(sys.argv[1], "w").write(hashlib.sha256(weights.tobytes()).hexdigest())

run_training(tiny_config(**json.loads(sys.argv[2])), train.load_data, train.define_network,
             callbacks=[Watch()])
"""


def start_workers(script: str, args_of, env: dict[str, str], count: int = 2, logs=None):
    """count processes of script, each with its TF_CONFIG on free 127.0.0.1 ports."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(count)]
    procs = []
    for index in range(count):
        worker_env = {**os.environ, **env, "TF_CONFIG": tf_config(workers, index)}
        out = open(logs / f"worker-{index}.log", "a") if logs else subprocess.PIPE  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, *args_of(index)],
                cwd=ROOT,
                env=worker_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


@pytest.mark.slow
def test_keras_still_needs_the_patch():
    """When this fails, Keras runs fit under MultiWorkerMirroredStrategy as shipped:
    remove patch_keras from engine/multiworker.py (and this test)."""
    results = {}
    for mode in ("plain", "patched"):
        procs = start_workers(KERAS_FIT, lambda i, mode=mode: [mode], {})
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        results[mode] = [("FIT-OK" in out, out) for out in outputs]
    assert all(ok for ok, _ in results["patched"]), results["patched"][0][1][-2000:]
    assert not any(ok for ok, _ in results["plain"]), (
        "Keras fit now works under MultiWorkerMirroredStrategy without the patch: remove "
        "engine.multiworker.patch_keras"
    )


def engine_env(tmp_path: Path, uri: str, run_id: str) -> dict[str, str]:
    return {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_RUN_ID": run_id,
        "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def new_run(uri: str) -> str:
    client = MlflowClient(uri)
    name = f"multiworker-{uuid.uuid4().hex[:8]}"
    return client.create_run(client.create_experiment(name)).info.run_id


def run_two(tmp_path, uri, run_id, overrides, kill_after=(0, 0)):
    sums = [tmp_path / f"weights-{i}.sha" for i in range(2)]
    started = time.monotonic()
    procs = start_workers(
        ENGINE_WORKER,
        lambda i: [str(sums[i]), json.dumps(overrides), str(kill_after[i])],
        engine_env(tmp_path, uri, run_id),
        logs=tmp_path,
    )
    ended: dict[int, float] = {}  # worker -> seconds from the start to its exit
    while len(ended) < len(procs) and time.monotonic() - started < 600:
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic() - started
        time.sleep(0.5)
    codes = [p.wait(timeout=1) for p in procs]
    return codes, sums, ended


def logged_once(client: MlflowClient, run_id: str, epochs: int) -> None:
    for name in ("loss", "val_loss", "epoch_seconds"):
        steps = [m.step for m in client.get_metric_history(run_id, name)]
        assert sorted(steps) == list(range(1, epochs + 1)), (name, steps)


# the in-memory pipeline (every worker holds the set; DATA auto-shard), and the streamed
# one (memory budget 0: each worker reads only its rows from the shared cache)
PIPELINES = {
    "memory": {"cache": False},
    "stream": {"memory_budget": "0"},
}


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_two_workers_train_into_one_run(tmp_path, mlflow_server, pipeline):
    data = tmp_path / "demo"
    make_demo_data(data, samples=48, image_size=32, seed=1)
    run_id = new_run(mlflow_server)
    model_name = f"tiny-mw-{uuid.uuid4().hex[:8]}"
    overrides = {
        "epochs": 3,
        "data_source": "imagedir",
        "data_dir": str(data),
        "cache_dir": str(tmp_path / "cache"),
        **PIPELINES[pipeline],
        "registered_model_name": model_name,
        "checkpoint_dir": str(tmp_path / "checkpoints"),
    }
    codes, sums, ended = run_two(tmp_path, mlflow_server, run_id, overrides)
    logs = "\n".join((tmp_path / f"worker-{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], logs
    client = MlflowClient(mlflow_server)
    seconds = [round(m.value, 1) for m in client.get_metric_history(run_id, "epoch_seconds")]
    print(f"two workers, {pipeline}, 3 epochs: {max(ended.values()):.0f} s, epochs {seconds} s")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["replicas"] == "2"
    assert run.data.params["global_batch_size"] == "16"  # 8 per worker
    # tf.distribute.MultiWorkerMirroredStrategy is this class
    assert run.data.params["distribute_strategy"] == "CollectiveAllReduceStrategy"
    assert run.data.params["data_pipeline"] == pipeline
    logged_once(client, run_id, 3)
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 1
    nodes = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")}
    assert {"worker-0", "worker-1"} <= nodes
    assert sums[0].read_text() == sums[1].read_text()  # the same final weights
    assert not (tmp_path / "checkpoints" / run_id).exists()  # the chief's, removed at the end


@pytest.mark.slow
def test_a_killed_worker_fails_the_run_which_resumes(tmp_path, mlflow_server):
    data = tmp_path / "demo"
    make_demo_data(data, samples=48, image_size=32, seed=1)
    run_id = new_run(mlflow_server)
    model_name = f"tiny-mw-{uuid.uuid4().hex[:8]}"
    overrides = {
        "epochs": 4,
        "data_source": "imagedir",
        "data_dir": str(data),
        "cache": False,
        "registered_model_name": model_name,
        "checkpoint_dir": str(tmp_path / "checkpoints"),
    }
    codes, _, ended = run_two(tmp_path, mlflow_server, run_id, overrides, kill_after=(0, 2))
    assert codes[1] == -9 and codes[0] != 0
    # the peer health check (every 30 s, 3 tries of 10 s) finds the dead worker
    print(f"the chief stopped {ended[0] - ended[1]:.0f} s after worker 1 died")
    assert ended[0] - ended[1] < 120
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert "--resume-run-id " + run_id in run.data.tags["resume_command"]
    assert client.search_model_versions(f"name = '{model_name}'") == []

    codes, sums, _ = run_two(
        tmp_path, mlflow_server, run_id, {**overrides, "resume_run_id": run_id}
    )
    logs = "\n".join((tmp_path / f"worker-{i}.log").read_text()[-3000:] for i in range(2))
    assert codes == [0, 0], logs
    assert client.get_run(run_id).info.status == "FINISHED"
    logged_once(client, run_id, 4)
    assert len(client.search_model_versions(f"name = '{model_name}'")) == 1
    assert sums[0].read_text() == sums[1].read_text()


# The engine over two logical CPU devices standing in for two GPUs; argv: tracking URI.
TWO_DEVICES = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from engine import devices
devices.gpu_devices = lambda: [d.name for d in tf.config.list_logical_devices("CPU")]
from tests.conftest import tiny_config, train_and_log
result = train_and_log(tiny_config(epochs=2, cache=False, data_dir=sys.argv[1]))
print("RUN", result.run_id)
"""


@pytest.mark.slow
def test_mirrored_strategy_over_two_logical_cpus(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("TF_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-c", TWO_DEVICES, str(tmp_path / "demo")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    run_id = done.stdout.split("RUN ")[-1].strip()
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["distribute_strategy"] == "MirroredStrategy"
    assert (run.data.params["replicas"], run.data.params["global_batch_size"]) == ("2", "16")
