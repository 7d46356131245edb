"""What every fork must keep: the two hooks' contracts, the one-way imports, a run that registers.

These run whatever train.py defines (its Config, load_data, define_network) on the
tiny data of tests/conftest.py:tiny_config; a fork with other data edits tiny_config
and keeps this file. Tests of the example network and data sources are elsewhere,
marked `example`.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from mlflow import MlflowClient

import train
from engine import mlproject
from engine.config import UserError
from engine.data_contract import DATA_CONTRACT, check_data
from engine.images import DataInfo
from engine.network import CONTRACT, build_network
from engine.prediction import predict
from engine.validation import validate
from tests.conftest import tiny_config, train_and_log

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the data contract


def test_load_data_keeps_its_contract(tmp_path):
    cfg = tiny_config(data_dir=str(tmp_path / "demo"))
    train_ds, val_ds, info = check_data(train.load_data(cfg))
    assert info.num_classes >= 2 and info.train_count > 0 and info.val_count > 0
    assert tuple(info.image_shape) == (cfg.image_size, cfg.image_size, cfg.channels)
    for ds, count in ((train_ds, info.train_count), (val_ds, info.val_count)):
        seen = 0
        for images, labels in ds:
            assert images.dtype in (tf.float32, tf.uint8)
            assert tuple(images.shape[1:]) == tuple(info.image_shape)
            assert labels.dtype.is_integer and labels.shape == (images.shape[0],)
            assert int(tf.reduce_min(labels)) >= 0 and int(tf.reduce_max(labels)) < info.num_classes
            assert float(tf.reduce_max(tf.cast(images, tf.float32))) <= 255.0
            assert images.shape[0] <= cfg.batch_size
            seen += int(images.shape[0])
        assert seen == count


def _one_batch(labels: np.ndarray) -> tf.data.Dataset:
    images = np.zeros((len(labels), 8, 8, 3), np.float32)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)


def _loaded(train_labels: np.ndarray, info) -> tuple:
    """What a load_data returns: a training batch of these labels, a good val_ds, info."""
    return _one_batch(train_labels), _one_batch(np.array([0, 1])), info


TWO_CLASSES_8PX = DataInfo((8, 8, 3), ["a", "b"], 2, 2)


@pytest.mark.parametrize(
    ("result", "says"),
    [
        ((1, 2), "returned tuple"),
        (_loaded(np.array([0, 1]), {"classes": 2}), "third value is dict"),
        (_loaded(np.eye(2, dtype=np.int32), TWO_CLASSES_8PX), "labels of int32"),
        (_loaded(np.array([0.0, 1.0]), TWO_CLASSES_8PX), "labels of float"),
        (_loaded(np.array([0, 1]), DataInfo((16, 16, 3), ["a", "b"], 2, 2)), "images of shape"),
    ],
    ids=["two-values", "no-datainfo", "one-hot-labels", "float-labels", "wrong-shape"],
)
def test_a_broken_load_data_is_refused_with_the_contract(result, says):
    with pytest.raises(UserError) as caught:
        check_data(result)
    assert says in str(caught.value) and DATA_CONTRACT in str(caught.value)


# ---------------------------------------------------------------- the network contract


@pytest.mark.parametrize("num_classes", [2, 3])
def test_define_network_keeps_its_contract(num_classes):
    cfg = tiny_config()
    shape = (cfg.image_size, cfg.image_size, cfg.channels)
    model, head = build_network(train.define_network, shape, num_classes, cfg)
    assert model.compiled
    assert head.units in ({1, 2} if num_classes == 2 else {num_classes})
    pixels = np.random.default_rng(0).uniform(0, 255, (3, *shape)).astype(np.float32)
    outputs = model.predict(pixels, verbose=0)
    assert outputs.shape == (3, head.units)
    assert ((outputs >= 0) & (outputs <= 1)).all()


class SubclassedNetwork(keras.Model):
    """A subclassed model, whose Conv2D would refuse the pipelines' uint8 pixels."""

    def __init__(self):
        super().__init__(name="subclassed")
        self.conv = keras.layers.Conv2D(4, 3)
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.head = keras.layers.Dense(1, activation="sigmoid")

    def call(self, images):
        return self.head(self.pool(self.conv(images / 255.0)))


@pytest.mark.parametrize("network", ["example", "subclassed"])
def test_the_built_model_takes_uint8_batches_and_float32_from_clients(network, tmp_path):
    cfg = tiny_config()
    shape = (cfg.image_size, cfg.image_size, cfg.channels)
    define = train.define_network if network == "example" else lambda *_: SubclassedNetwork()
    model, head = build_network(define, shape, 2, cfg)
    train_ds, _, _ = check_data(train.load_data(tiny_config(data_dir=str(tmp_path / "demo"))))
    images, labels = next(iter(train_ds))
    assert images.dtype == tf.uint8  # a quarter of float32's bytes to the device
    target = tf.cast(labels, tf.float32)[:, None] if head.binary else tf.one_hot(labels, 2)
    model.fit(images, target, verbose=0)
    np.testing.assert_allclose(
        model.predict(images, verbose=0),
        model.predict(tf.cast(images, tf.float32).numpy(), verbose=0),  # as a client sends
        atol=1e-6,
    )


def _small_body(input_shape):
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    return inputs, keras.layers.GlobalAveragePooling2D()(x)


def softmax_two_units(input_shape, num_classes, cfg):
    """A binary problem with a K=2 softmax head, returned uncompiled."""
    inputs, x = _small_body(input_shape)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))


def sigmoid_compiled_by_the_fork(input_shape, num_classes, cfg):
    """One sigmoid unit, compiled by the fork with its own optimizer and metric names."""
    inputs, x = _small_body(input_shape)
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x), name="fork")
    model.compile(optimizer="sgd", loss="binary_crossentropy", metrics=["binary_accuracy"])
    return model


def sparse_softmax_compiled(input_shape, num_classes, cfg):
    """K softmax units compiled with a sparse loss: the engine must feed class indices."""
    inputs, x = _small_body(input_shape)
    model = keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@pytest.mark.slow
@pytest.mark.parametrize(
    "network", [softmax_two_units, sigmoid_compiled_by_the_fork, sparse_softmax_compiled]
)
def test_a_forks_network_trains_registers_validates_and_predicts(
    network, tracking_store, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(train, "define_network", network)
    cfg = tiny_config(data_dir=str(tmp_path / "demo"), epochs=2)
    result = train_and_log(cfg)
    client = MlflowClient()
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert result.model_version == "1"
    assert {"confusion_matrix.png", "roc_curve.png"} <= {
        Path(a.path).name for a in client.list_artifacts(result.run_id, "plots")
    }
    final_auc = client.get_run(result.run_id).data.metrics["final_val_auc"]
    assert 0.0 <= final_auc <= 1.0

    validation = validate("models:/tiny-classifier/1", cfg, train.load_data, metric="accuracy")
    assert validation.promoted and validation.candidate.probs.shape[1] == 2
    # validate decides on the test split the run scored once at its end
    test_auc = client.get_run(result.run_id).data.metrics["test_auc"]
    assert validation.candidate.metrics["auc"] == pytest.approx(test_auc)

    output = predict(
        "models:/tiny-classifier@champion", [str(tmp_path / "demo")], tmp_path / "preds.csv"
    )
    rows = output.read_text().splitlines()
    assert rows[0].startswith("path,predicted_class,probability,")
    assert len(rows) == 1 + cfg.demo_samples
    assert {row.split(",")[1] for row in rows[1:]} <= {"parasitized", "uninfected"}
    assert all(0.5 <= float(row.split(",")[2]) <= 1.0 for row in rows[1:])


# The files whose tests read a trained model's outputs (predict, serve, validate, the
# registered model) through train.define_network; under TEST_FORK_HEAD=softmax2 it ends
# in a fork's own two-unit softmax head. The fork tests above set their own heads.
FORK_HEAD_SUITE = ["test_lifecycle.py", "test_serving.py", "test_train_e2e.py", "test_contract.py"]


@pytest.mark.slow
def test_the_suite_passes_for_a_fork_with_its_own_softmax_head(tmp_path):
    """The README lets a fork return a two-unit softmax head for two classes: every test
    not marked `example` must hold for it (tests/conftest.py:fork_head swaps it in)."""
    here = "tests/test_contract.py::"
    command = [
        *(sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"),
        *("-m", "not example and not docker and not postgres"),
        *("--basetemp", str(tmp_path / "basetemp")),
        *("--deselect", here + "test_the_suite_passes_for_a_fork_with_its_own_softmax_head"),
        *("--deselect", here + "test_a_forks_network_trains_registers_validates_and_predicts"),
        *(f"tests/{name}" for name in FORK_HEAD_SUITE),
    ]
    env = {**os.environ, "TEST_FORK_HEAD": "softmax2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]


def _flat_network(units: int, input_shape=None, **dense):
    """A define_network: Flatten, then one Dense layer of `units` (**dense its options), on
    input_shape (default: the data's)."""

    def define(shape, num_classes, cfg):
        layers = [keras.layers.Flatten(), keras.layers.Dense(units, **dense)]
        return keras.Sequential([keras.Input(input_shape or shape), *layers])

    return define


@pytest.mark.parametrize(
    ("network", "says"),
    [
        (lambda shape, k, cfg: None, "returned NoneType, not a model"),
        (_flat_network(3, activation="softmax"), "the output must be (2, 1 or 2)"),
        (_flat_network(1, kernel_initializer="ones"), "not probabilities"),
        (_flat_network(1, (5, 5, 3), activation="sigmoid"), "does not accept images of shape"),
    ],
    ids=["not-a-model", "three-units-for-two-classes", "logits", "wrong-input-shape"],
)
def test_a_broken_network_stops_before_any_run(
    network, says, tracking_store, tmp_path, monkeypatch
):
    monkeypatch.setattr(train, "define_network", network)
    with pytest.raises(UserError) as caught:
        train_and_log(tiny_config(data_dir=str(tmp_path / "demo")))
    assert says in str(caught.value) and CONTRACT in str(caught.value)
    assert mlflow.MlflowClient().get_experiment_by_name("tests") is None, "no run may exist"


def test_main_prints_a_contract_error_without_a_traceback(
    tracking_store, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(train, "define_network", lambda shape, k, cfg: "a model, promise")
    flags = "--data-source demo --demo-samples 8 --image-size 16 --convolutions 1"
    argv = ["--data-dir", str(tmp_path / "demo"), *flags.split()]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: define_network returned str") and "Traceback" not in err


# ---------------------------------------------------------------- layout and imports


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_engine_never_imports_train_or_lifecycle():
    for path in sorted((ROOT / "engine").rglob("*.py")):
        assert not _imported_modules(path) & {"train", "lifecycle"}, path.name


def test_lifecycle_uses_only_trains_public_hooks():
    tree = ast.parse((ROOT / "lifecycle.py").read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "train"
    }
    assert used and used <= {"Config", "load_data", "define_network"}, used


def test_importing_train_lifecycle_and_the_engine_changes_nothing():
    script = """
import os, signal, sys
before = dict(os.environ)
import engine, engine.cli, engine.training, engine.sources, engine.tracking
import engine.tune, engine.tune.coordinator, engine.tune.worker
import train, lifecycle
changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}
assert not changed, changed
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
import keras
assert keras.mixed_precision.global_policy().name == "float32"
print("unchanged")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "unchanged" in done.stdout, done.stderr[-2000:]


def test_mlproject_main_is_written_from_config():
    text = (ROOT / "MLproject").read_text()
    assert mlproject.update(text, train.Config) == text, "MLproject is stale: run make mlproject"


def test_train_py_stays_the_forkers_short_file():
    lines = (ROOT / "train.py").read_text().splitlines()
    assert len(lines) <= 350
    top = {n.name for n in ast.parse("\n".join(lines)).body if isinstance(n, ast.FunctionDef)}
    assert {"load_data", "define_network", "main"} <= top
