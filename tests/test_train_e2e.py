"""Whole training runs on tiny data into real, temporary tracking stores."""

from __future__ import annotations

import dataclasses
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

import engine.training
import train
from engine.config import UserError
from engine.network import class_probabilities
from engine.serving import load_network, png_base64
from engine.sources import make_demo_data
from tests.conftest import tiny_config, train_and_log
from tests.servers import free_port

pytestmark = pytest.mark.slow

EPOCH_METRICS = ["loss", "accuracy", "auc", "precision", "recall"]


def cfg_args(cfg: train.Config) -> list[str]:
    return [
        arg for f in dataclasses.fields(cfg) for arg in (f"--{f.name}", str(getattr(cfg, f.name)))
    ]


def test_main_trains_logs_and_registers(tracking_store, tmp_path, capsys):
    cfg = tiny_config(data_dir=str(tmp_path / "demo"), epochs=2, export_savedmodel=True)
    assert train.main(cfg_args(cfg)) == 0
    out = capsys.readouterr().out
    run_id = out.split("run_id: ")[1].split()[0]
    assert "registered model: tiny-classifier version 1 (alias candidate)" in out
    assert "val_accuracy: " in out and "test_accuracy: " in out

    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2"
    assert run.data.params["class_names"] == "parasitized,uninfected"
    assert run.data.tags["data_source"] == "demo"
    assert len(run.data.tags["git_commit"]) in (40, len("unknown"))
    for name in EPOCH_METRICS + [f"val_{m}" for m in EPOCH_METRICS]:
        history = client.get_metric_history(run_id, name)
        assert sorted(m.step for m in history) == [1, 2], name

    def listing(path=None):
        return {a.path for a in client.list_artifacts(run_id, path)}

    assert {"model_summary.txt", "plots", "tf_serving"} <= listing()
    assert listing("plots") == {
        "plots/learning_curves.png",
        "plots/confusion_matrix.png",
        "plots/roc_curve.png",
        "plots/test",
    }
    assert "tf_serving/1/saved_model.pb" in listing("tf_serving/1")
    summary = mlflow.artifacts.load_text(f"runs:/{run_id}/model_summary.txt")
    assert "conv2d" in summary.lower()

    version = client.get_model_version_by_alias("tiny-classifier", "candidate")
    assert version.run_id == run_id and str(version.version) == "1"
    model = mlflow.pyfunc.load_model("models:/tiny-classifier@candidate")
    assert model.metadata.metadata["class_names"] == ["parasitized", "uninfected"]
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3))
    answers = model.predict(pd.DataFrame({"image": [png_base64(x) for x in images]}))
    assert set(answers["class"]) <= {"parasitized", "uninfected"} and len(answers) == 3
    assert all(0 <= p <= 1 for p in answers["probability"])
    network = load_network("models:/tiny-classifier@candidate")  # the raw-pixel network
    outputs = network.predict(images.astype(np.float32), verbose=0)
    assert class_probabilities(outputs).shape == (3, 2)  # either head


def test_multiclass_run_uses_softmax_and_skips_roc(tracking_store, tmp_path):
    root = tmp_path / "shapes"
    for c, name in enumerate(["circle", "square", "triangle"]):
        make_demo_data(tmp_path / name, 8, 24, seed=c)
        root.mkdir(exist_ok=True)
        (tmp_path / name / "parasitized").rename(root / name)
    cfg = tiny_config(data_source="imagedir", data_dir=str(root), val_split=0.25)
    result = train_and_log(cfg)
    client = MlflowClient()
    assert client.get_run(result.run_id).data.params["num_classes"] == "3"
    plots = {a.path for a in client.list_artifacts(result.run_id, "plots")}
    assert "plots/roc_curve.png" not in plots and "plots/confusion_matrix.png" in plots
    model = load_network(f"models:/tiny-classifier/{result.model_version}")
    assert model.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0).shape == (2, 3)


def test_class_names_with_spaces_accents_and_punctuation(tracking_store, tmp_path):
    """Folder names are class names, and class names end up in metric names."""
    make_demo_data(tmp_path / "cells", 40, 32, seed=4)
    root = tmp_path / "my data (v2)"
    root.mkdir()
    (tmp_path / "cells" / "parasitized").rename(root / "P. falciparum")
    (tmp_path / "cells" / "uninfected").rename(root / "négatif (sain)")
    for i, path in enumerate(sorted((root / "P. falciparum").glob("*.png"))[:5]):
        path.rename(path.with_name(f"cell #{i} ü.PNG"))  # spaces, #, accents, upper case
    result = train_and_log(tiny_config(data_source="imagedir", data_dir=str(root)))
    run = MlflowClient().get_run(result.run_id)
    assert run.data.params["class_names"] == "P. falciparum,négatif (sain)"
    assert run.data.params["class_counts.test"] == "P. falciparum=2, négatif (sain)=2"
    assert "test_recall_P. falciparum" in run.data.metrics
    assert "test_recall_négatif _sain_" in run.data.metrics
    names = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/class_metric_names.json")
    assert names == {"P. falciparum": "P. falciparum", "négatif (sain)": "négatif _sain_"}


def test_failed_run_is_marked_failed_and_registers_nothing(tracking_store, tmp_path, monkeypatch):
    def broken_evaluation(*args, **kwargs):
        raise RuntimeError("disk full while plotting")

    monkeypatch.setattr(engine.training, "log_evaluation", broken_evaluation)
    with pytest.raises(RuntimeError, match="disk full"):
        train_and_log(tiny_config(data_dir=str(tmp_path / "demo")))
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert client.search_registered_models() == []


def test_bad_data_fails_before_any_run(tracking_store, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train_and_log(tiny_config(data_source="imagedir", data_dir=str(tmp_path / "nope")))
    assert MlflowClient().get_experiment_by_name("tests") is None


def test_unreachable_server_fails_in_seconds(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        train_and_log(tiny_config(data_dir=str(tmp_path / "demo")))
    assert time.monotonic() - started < 10
    assert "is unreachable" in str(caught.value) and "make server" in str(caught.value)
    assert not (tmp_path / "demo").exists(), "no work may start before the check"


def test_run_started_by_mlflow_run_is_reused(tracking_store, tmp_path, monkeypatch):
    client = MlflowClient()
    experiment_id = client.create_experiment("launched")
    launched = client.create_run(experiment_id)
    # as `mlflow run` logs them: its entry point's parameters, shell-quoted
    client.log_param(launched.info.run_id, "run_name", "''")
    client.log_param(launched.info.run_id, "epochs", "1")
    monkeypatch.setenv("MLFLOW_RUN_ID", launched.info.run_id)
    result = train_and_log(tiny_config(data_dir=str(tmp_path / "demo"), registered_model_name=""))
    assert result.run_id == launched.info.run_id
    assert result.model_version is None
    run = client.get_run(launched.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["run_name"] == "''" and run.data.params["seed"] == "42"


def test_training_against_a_real_tracking_server(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    result = train_and_log(
        tiny_config(data_dir=str(tmp_path / "demo"), registered_model_name="served")
    )
    client = MlflowClient(mlflow_server)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(result.run_id, "val_loss")) == 1
    assert {a.path for a in client.list_artifacts(result.run_id)} >= {"model_summary.txt", "plots"}
    assert client.get_model_version_by_alias("served", "candidate").run_id == result.run_id
    # artifacts travel over HTTP (proxied): loading needs no shared folder
    model = mlflow.pyfunc.load_model(result.model_uri)
    answers = model.predict(pd.DataFrame({"image": [png_base64(np.zeros((32, 32, 3)))] * 2}))
    assert list(answers["error"]) == [None, None] and len(answers["probabilities"][0]) == 2
