"""The engine's training loop: precision, the best epoch, early stopping, resume after a
crash, and what a run records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from mlflow import MlflowClient

import train
from engine import checkpoints, devices
from engine.checkpoints import STATE_FILE
from engine.common import STOP_SIGNALS
from engine.config import UserError
from engine.devices import choose_strategy, compute_dtype, set_precision
from engine.evaluation import classification_metrics
from engine.network import class_probabilities
from engine.scoring import predict_probabilities
from engine.serving import load_network
from engine.tracking import check_tracking_uri
from tests.conftest import tiny_config, train_and_log

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fast


@pytest.mark.parametrize(
    ("setting", "capabilities", "dtype"),
    [
        ("auto", [], "float32"),
        ("auto", [(9, 0)], "bfloat16"),
        ("auto", [(8, 0), (9, 0)], "bfloat16"),
        ("auto", [(7, 5)], "float16"),
        ("auto", [(8, 6), (7, 0)], "float16"),  # the oldest GPU decides
        ("true", [(8, 0)], "bfloat16"),
        ("bfloat16", [(7, 5)], "bfloat16"),
        ("float16", [(9, 0)], "float16"),
        ("float16", [], "float32"),
        ("float32", [(9, 0)], "float32"),
        ("false", [(9, 0)], "float32"),
    ],
)
def test_compute_dtype(setting, capabilities, dtype):
    assert compute_dtype(setting, capabilities) == dtype


def test_precision_is_float32_on_the_cpu(capsys):
    assert set_precision(tiny_config(mixed_precision="auto")) == "float32"
    assert set_precision(tiny_config(mixed_precision="bfloat16")) == "float32"
    assert "bfloat16 compute needs a GPU" in capsys.readouterr().out
    assert keras.mixed_precision.global_policy().name == "float32"


def test_strategy_prefetches_to_the_one_gpu(monkeypatch):
    assert choose_strategy(tiny_config()) is tf.distribute.get_strategy()  # no GPU here
    # with one GPU (the CPU stands in for it), or several and --distribute false:
    # OneDeviceStrategy, whose input pipeline copies batches onto the device ahead
    for gpus, distribute in ((["/cpu:0"], True), (["/cpu:0", "/cpu:1"], False)):
        monkeypatch.setattr(devices, "gpu_devices", lambda gpus=gpus: gpus)
        strategy = choose_strategy(tiny_config(distribute=distribute))
        assert isinstance(strategy, tf.distribute.OneDeviceStrategy)
        assert strategy.extended.worker_devices[0].endswith("CPU:0")


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("localhost:5000", "did you mean http://localhost:5000?"),
        ("htp://127.0.0.1:5000", "is not a tracking URI"),
        ("my server", "is not a tracking URI"),
        ("postgresql://u:p@127.0.0.1:1/db", "is unreachable"),
    ],
)
def test_bad_tracking_uris_say_what_to_use(uri, says):
    with pytest.raises(UserError) as caught:
        check_tracking_uri(uri, timeout=2)
    assert says in str(caught.value) and "Nothing was trained" in str(caught.value)


def test_a_bad_tracking_uri_stops_main_without_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "localhost:5000")
    assert train.main(["--data-source", "demo", "--data-dir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MLFLOW_TRACKING_URI 'localhost:5000'") and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


def test_an_unknown_monitor_is_refused_before_any_run():
    with pytest.raises(UserError, match="monitor must be one of val_loss"):
        tiny_config(monitor="val_f2").validate()


# ---------------------------------------------------------------- slow: whole runs


@pytest.mark.slow
def test_the_registered_model_is_the_best_epoch(tracking_store, tmp_path, capsys):
    cfg = tiny_config(
        data_dir=str(tmp_path / "demo"), epochs=4, learning_rate=0.02, lr_schedule="constant"
    )
    result = train_and_log(cfg)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    val_loss = [
        m.value
        for m in sorted(client.get_metric_history(result.run_id, "val_loss"), key=lambda m: m.step)
    ]
    best = int(np.argmin(val_loss)) + 1  # epochs are numbered from 1, as Keras prints them
    assert run.data.metrics["best_epoch"] == best == result.best_epoch
    assert run.data.metrics["best_val_loss"] == pytest.approx(val_loss[best - 1])
    # the registered weights are that epoch's: they score its val_loss on the same images
    _, val_ds, _ = train.load_data(cfg)
    model = load_network(f"models:/tiny-classifier/{result.model_version}")
    labels, probs = predict_probabilities(model, val_ds)
    assert classification_metrics(labels, probs)["loss"] == pytest.approx(
        val_loss[best - 1], rel=1e-3
    )
    out = capsys.readouterr().out
    assert f"best epoch: {best} of 4 (val_loss {val_loss[best - 1]:.4f})" in out


def frozen_network(input_shape, num_classes, cfg):
    """A network that cannot learn (SGD at rate 0): its val_loss never improves."""
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="binary_crossentropy")
    return model


@pytest.mark.slow
def test_early_stopping_ends_the_run_after_patience_epochs(tracking_store, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "define_network", frozen_network)
    cfg = tiny_config(data_dir=str(tmp_path / "demo"), epochs=10, early_stopping_patience=2)
    result = train_and_log(cfg)
    steps = [m.step for m in MlflowClient().get_metric_history(result.run_id, "val_loss")]
    assert sorted(steps) == [1, 2, 3] and result.best_epoch == 1


@pytest.mark.slow
def test_a_run_records_speed_system_metrics_and_best_epoch(tracking_store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    # the one-GPU path, OneDeviceStrategy, with the CPU standing in for the GPU
    monkeypatch.setattr(devices, "gpu_devices", lambda: ["/cpu:0"])
    result = train_and_log(tiny_config(data_dir=str(tmp_path / "demo"), epochs=3))
    client = MlflowClient()
    for name in ("epoch_seconds", "images_per_second"):
        history = client.get_metric_history(result.run_id, name)
        assert sorted(m.step for m in history) == [1, 2, 3] and all(m.value > 0 for m in history)
    metrics = client.get_run(result.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in metrics), sorted(metrics)
    assert "best_epoch" in metrics and "final_val_auc" in metrics
    params = client.get_run(result.run_id).data.params
    assert params["dtype_policy"] == "float32"
    assert params["distribute_strategy"] == "OneDeviceStrategy"
    # the test split: scored once, at the end, with its own plots
    assert (params["train_count"], params["val_count"], params["test_count"]) == ("34", "10", "4")
    assert params["class_counts.test"] == "parasitized=2, uninfected=2"
    once = "test_accuracy test_auc test_loss test_balanced_accuracy test_recall_parasitized"
    for name in [*once.split(), "test_precision_uninfected"]:
        assert len(client.get_metric_history(result.run_id, name)) == 1, name
    assert result.test_metrics["test_accuracy"] == metrics["test_accuracy"]
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots/test")}
    assert plots == {"plots/test/confusion_matrix.png", "plots/test/roc_curve.png"}
    # the data it saw: one dataset input, a table of every file with its split
    inputs = client.get_run(result.run_id).inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "demo"
    assert len(inputs[0].dataset.digest) == 16
    assert json.loads(inputs[0].dataset.profile)["num_rows"] == 48


def _train_command(tmp_path: Path, *extra: str) -> list[str]:
    flags = (
        "--data-source demo --demo-samples 600 --image-size 32 --convolutions 1 --dense-units 8 "
        "--batch-size 8 --randomize-images false --experiment-name resume "
        "--registered-model-name resumed --export-savedmodel false --system-metrics false"
    )
    folders = ["--data-dir", str(tmp_path / "demo"), "--checkpoint-dir", str(tmp_path / "ckpt")]
    return [sys.executable, str(ROOT / "train.py"), *flags.split(), *folders, *extra]


def _wait_for_epoch(process: subprocess.Popen, root: Path, epoch: int, limit: float = 600) -> str:
    """Poll the checkpoint state until `epoch` (0-based) is done; return the run id.

    The limit is generous: on a loaded machine importing TensorFlow alone takes a minute."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        for state in root.glob(f"*/{STATE_FILE}"):
            try:
                if json.loads(state.read_text())["epoch"] >= epoch:
                    return state.parent.name
            except (json.JSONDecodeError, KeyError):
                pass  # caught mid-replace
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} within {limit} s")


@pytest.mark.slow
def test_a_killed_run_resumes_into_the_same_run(tracking_store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_store}
    started = time.monotonic()
    process = subprocess.Popen(
        _train_command(tmp_path, "--epochs", "8"),
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    run_id = _wait_for_epoch(process, tmp_path / "ckpt", epoch=2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    killed_after = json.loads((tmp_path / "ckpt" / run_id / STATE_FILE).read_text())["epoch"]
    assert process.returncode == -signal.SIGKILL and killed_after < 7
    client = MlflowClient()
    assert client.get_run(run_id).info.status == "RUNNING"  # SIGKILL leaves it so
    first = time.monotonic() - started

    done = subprocess.run(
        _train_command(tmp_path, "--resume-run-id", run_id),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resuming run {run_id} after epoch {killed_after + 1} of 8" in done.stdout
    assert f"run_id: {run_id}" in done.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val_loss"))
    assert steps == list(range(1, 9)), steps  # each epoch once: no gap, no duplicate
    versions = client.search_model_versions("name='resumed'")
    assert [v.run_id for v in versions] == [run_id]
    assert not (tmp_path / "ckpt" / run_id).exists(), "a finished run's checkpoints are removed"
    print(
        f"\nresume test: killed after epoch {killed_after + 1} at {first:.1f} s; "
        f"resume took {time.monotonic() - started - first:.1f} s"
    )


@pytest.mark.slow
def test_sigterm_leaves_a_failed_run_that_says_how_to_resume(tracking_store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_store}
    process = subprocess.Popen(
        _train_command(tmp_path, "--epochs", "30"),
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    run_id = _wait_for_epoch(process, tmp_path / "ckpt", epoch=0)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert f"resume it with:\n  python train.py --resume-run-id {run_id}" in output
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["resume_command"].startswith(f"python train.py --resume-run-id {run_id}")
    assert (tmp_path / "ckpt" / run_id / STATE_FILE).exists()


def test_resuming_a_run_without_a_checkpoint_says_where_it_looked(tracking_store, tmp_path):
    with pytest.raises(UserError, match="no checkpoint of run abc123 in"):
        train_and_log(tiny_config(resume_run_id="abc123", checkpoint_dir=str(tmp_path)))


def test_class_probabilities_reads_both_heads():
    np.testing.assert_allclose(class_probabilities(np.array([[0.25]])), [[0.75, 0.25]])
    np.testing.assert_allclose(class_probabilities(np.array([[0.1, 0.9]])), [[0.1, 0.9]])


def test_a_stop_signal_whose_exit_was_lost_stops_after_the_batch():
    """The SystemExit of the SIGTERM handler vanishes when it lands in a __del__; the
    callback still stops training, with the status the handler would have given."""
    callback = checkpoints.StopOnSignal()
    callback.on_train_batch_end(0)  # no signal: nothing happens
    STOP_SIGNALS.append(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stopped:
            callback.on_train_batch_end(1)
        assert stopped.value.code == 128 + signal.SIGTERM
    finally:
        STOP_SIGNALS.clear()
