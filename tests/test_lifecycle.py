"""lifecycle.py: validate, predict, serve, export and reap-runs on real models and stores."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

import lifecycle
import train
from engine import prediction, reaping, validation
from engine.config import UserError
from engine.network import class_probabilities
from engine.registry import resolve_model
from engine.serving import load_network
from engine.sources import make_demo_data
from engine.tracking import export_tf_serving
from tests.conftest import module_store, tiny_config, train_and_log

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- fast: pure functions


def test_loss_is_better_when_lower_and_ties_keep_the_champion():
    assert validation.is_better(0.2, 0.3, "loss")
    assert not validation.is_better(0.3, 0.2, "loss")
    assert validation.is_better(0.9, 0.8, "auc")
    assert not validation.is_better(0.8, 0.8, "auc")
    assert not validation.is_better(0.81, 0.8, "auc", min_delta=0.05)


def test_collect_paths_from_folders_files_and_tables(demo_dir, tmp_path):
    images = sorted(str(p) for p in demo_dir.rglob("*.png"))
    assert prediction.collect_paths([str(demo_dir)]) == images
    assert prediction.collect_paths(images[:2]) == images[:2]

    table = demo_dir / "batch.csv"  # relative paths, read from the table's folder
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "other"])
        for path in images[:3]:
            writer.writerow([Path(path).relative_to(demo_dir), "x"])
    assert prediction.collect_paths([str(table)], path_column="file") == images[:3]
    records = tmp_path / "batch.json"
    records.write_text(json.dumps([{"path": p} for p in images[:2]]))
    assert prediction.collect_paths([str(records)]) == images[:2]

    with pytest.raises(UserError, match="no column 'path'.*--path-column"):
        prediction.collect_paths([str(table)])
    with pytest.raises(UserError, match="does not exist"):
        prediction.collect_paths([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        prediction.collect_paths([str(tmp_path / "empty")])


def test_tf_serving_export_answers_like_the_keras_model(tmp_path):
    import tensorflow as tf

    cfg = tiny_config()
    model = train.define_network((32, 32, 3), 2, cfg)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    target = export_tf_serving(model, tmp_path / "serving" / "cells")
    assert target == tmp_path / "serving" / "cells" / "1"
    assert (target / "saved_model.pb").exists()
    serving = tf.saved_model.load(str(target)).signatures["serving_default"]
    (output,) = serving(tf.constant(images)).values()
    np.testing.assert_allclose(output.numpy(), model.predict(images, verbose=0), atol=1e-5)
    with pytest.raises(UserError, match="immutable"):
        export_tf_serving(model, tmp_path / "serving" / "cells")


def test_unknown_model_says_what_exists(tracking_store):
    with pytest.raises(UserError, match="no registered model 'nothing-here'"):
        resolve_model("models:/nothing-here@champion")
    with pytest.raises(UserError, match="names no version"):
        resolve_model("models:/nothing-here")


def test_reap_runs_marks_only_runs_whose_process_is_gone(tracking_store):
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("reap")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host = socket.gethostname()
    gone = client.create_run(
        experiment, tags={"process.host": host, "process.pid": dead.stdout.strip()}
    )
    alive = client.create_run(
        experiment, tags={"process.host": host, "process.pid": str(os.getpid())}
    )
    quiet = client.create_run(experiment)  # no process tags: judged by inactivity only

    assert reaping.reap_runs(["reap"], stale_minutes=60, dry_run=True) == [gone.info.run_id]
    assert client.get_run(gone.info.run_id).info.status == "RUNNING"
    assert reaping.reap_runs(["reap"], stale_minutes=60) == [gone.info.run_id]
    assert client.get_run(gone.info.run_id).info.status == "FAILED"
    assert "has exited" in client.get_run(gone.info.run_id).data.tags["failure_reason"]
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(quiet.info.run_id).info.status == "RUNNING"
    assert set(reaping.reap_runs(["reap"], stale_minutes=0)) == {
        alive.info.run_id,
        quiet.info.run_id,
    }


def test_cli_errors_are_one_line_and_exit_2(tracking_store, capsys):
    assert lifecycle.main(["predict", "--model", "models:/none@champion", "--input", "x"]) == 2
    assert "error: registered model 'none' has no alias 'champion'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lifecycle.main(["validate", "--metric", "speed"])


def test_help_and_request_load_neither_tensorflow_nor_mlflow(tmp_path):
    """`lifecycle.py --help` and `lifecycle.py request` answer at once: the parser and the
    HTTP client import no TensorFlow, Keras or MLflow; train.py is imported, and is light
    (checked in a fresh interpreter, since this one has them all)."""
    image = tmp_path / "cell.png"
    Image.new("L", (4, 4), 0).save(image)
    script = f"""
import sys, lifecycle
lifecycle.build_parser()
assert lifecycle.main(["request", "--print-json", {str(image)!r}]) == 0
heavy = {{"tensorflow", "keras", "mlflow"}} & {{m.split(".")[0] for m in sys.modules}}
assert not heavy, heavy
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


# ---------------------------------------------------------------- slow: trained models


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two registered versions of a tiny model in a fresh local store, and its data."""
    root = tmp_path_factory.mktemp("registry")
    data_dir = root / "demo"
    with module_store(f"sqlite:///{root / 'mlflow.db'}") as uri:
        versions = []
        for epochs in (1, 2):
            cfg = tiny_config(data_dir=str(data_dir), epochs=epochs, registered_model_name="cells")
            versions.append(train_and_log(cfg).model_version)
        yield {"uri": uri, "data_dir": data_dir, "versions": versions, "root": root}


def _data_cfg(registry) -> train.Config:
    return tiny_config(data_dir=str(registry["data_dir"]))


@pytest.mark.slow
def test_validate_promotes_then_compares_with_the_champion(registry, capsys):
    client = mlflow.MlflowClient(registry["uri"])
    first, second = registry["versions"]

    result = validation.validate(
        "models:/cells/" + first, _data_cfg(registry), train.load_data, metric="accuracy"
    )
    assert result.promoted and "no 'champion' yet" in result.reason
    assert str(client.get_model_version_by_alias("cells", "champion").version) == first
    run = client.get_run(result.run_id)
    assert {"accuracy", "auc", "loss", "precision", "recall", "f1"} <= set(run.data.metrics)
    plots = {f.path for f in client.list_artifacts(result.run_id, "plots")}
    assert plots == {"plots/confusion_matrix.png", "plots/roc_curve.png"}
    assert client.get_model_version("cells", first).tags["validation_run_id"] == result.run_id
    # validate decides on the test split training held out and scored once at its end:
    # the same images, so the same score
    assert run.data.params["split"] == "test" and "test-split images" in result.reason
    training_run = client.get_run(client.get_model_version("cells", first).run_id)
    for name in ("accuracy", "auc", "loss"):
        assert run.data.metrics[name] == pytest.approx(
            training_run.data.metrics[f"test_{name}"], abs=1e-6
        )

    # A candidate that must win by more than any score can differ: kept, alias unchanged.
    cfg = _data_cfg(registry)
    kept = validation.validate(
        second, cfg, train.load_data, metric="auc", min_delta=2.0, model_name="cells"
    )
    assert not kept.promoted and "does not beat" in kept.reason
    assert str(client.get_model_version_by_alias("cells", "champion").version) == first
    assert "champion_auc" in client.get_run(kept.run_id).data.metrics

    # A candidate that wins: the alias moves; the decision follows the two scores.
    won = validation.validate(
        second, cfg, train.load_data, metric="auc", min_delta=-2.0, model_name="cells"
    )
    assert won.promoted and "beats" in won.reason
    assert str(client.get_model_version_by_alias("cells", "champion").version) == second

    argv = ["validate", "--model-name", "cells", "--model", "champion", "--data-source", "demo"]
    argv += ["--data-dir", str(registry["data_dir"]), "--demo-samples", "48"]
    assert lifecycle.main(argv) == 0
    assert "KEPT: cells version 2 already is the 'champion'" in capsys.readouterr().out


@pytest.mark.slow
def test_validate_refuses_data_with_other_classes(registry, tmp_path):
    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / name / f"{i}.png")
    cfg = tiny_config(data_source="imagedir", data_dir=str(tmp_path))
    with pytest.raises(UserError, match="differ from the classes"):
        validation.validate("models:/cells/1", cfg, train.load_data)


@pytest.mark.slow
def test_validate_without_a_test_split_says_what_to_give(registry):
    cfg = tiny_config(data_dir=str(registry["data_dir"]), test_split=0.0)
    with pytest.raises(UserError, match="has no test split .* give --test-split above 0"):
        validation.validate("models:/cells/1", cfg, train.load_data)
    assert validation.validate(
        "models:/cells/1", cfg, train.load_data, split="validation", promote=False
    ).run_id


@pytest.mark.slow
def test_predict_writes_the_models_own_answers(registry, tmp_path, capsys):
    # Made at the model's 32 px, so resizing must leave the pixels as they are.
    make_demo_data(tmp_path / "new", samples=6, image_size=32, seed=7)
    images = sorted((tmp_path / "new").rglob("*.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    output = tmp_path / "out" / "predictions.csv"
    prediction.predict("models:/cells/1", [str(p) for p in images] + [str(broken)], output)
    assert "skipped 1 unreadable" in capsys.readouterr().out

    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(p.resolve()) for p in images]
    # Same answers as the logged Keras model on the raw pixels.
    model = load_network("models:/cells/1")
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB"), "float32") for p in images])
    probs = class_probabilities(model.predict(pixels, verbose=0))  # either head's outputs
    expected = np.array(["parasitized", "uninfected"])[probs.argmax(axis=1)]
    assert [r["predicted_class"] for r in rows] == list(expected)
    np.testing.assert_allclose(
        [float(r["probability"]) for r in rows], probs.max(axis=1), atol=1e-5
    )


@pytest.mark.slow
def test_export_subcommand_writes_a_loadable_savedmodel(registry, tmp_path):
    import tensorflow as tf

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", registry["uri"])
        argv = ["export", "--model", "models:/cells/1", "--output", str(tmp_path / "cells")]
        assert lifecycle.main(argv) == 0
    loaded = tf.saved_model.load(str(tmp_path / "cells" / "1"))
    assert "serving_default" in loaded.signatures
