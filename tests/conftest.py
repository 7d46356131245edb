"""Shared fixtures: tiny generated data and real, temporary tracking stores."""

from __future__ import annotations

import contextlib
import dataclasses
import os

# Tests report no usage to MLflow (CI turns its telemetry off by itself): off in this
# process and the ones tests start. Set before mlflow's import, which reads it; MLflow
# would otherwise put a telemetry session id into os.environ.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import keras
import mlflow
import mlflow.tracking.fluent
import pytest

import train
from engine import cache as image_cache
from engine.config import RunConfig
from engine.sources import make_demo_data
from engine.training import TrainResult, run_training
from tests import host_fakes
from tests.servers import MlflowServer

FORK_HEAD = os.environ.get("TEST_FORK_HEAD", "")
"""TEST_FORK_HEAD=softmax2 runs the session as a fork whose define_network ends in its own
uncompiled Dense(num_classes, softmax) head, as the README allows (two units for two
classes); unset, train.py's own head. tests/test_contract.py runs the suite both ways."""

EXAMPLE_DEFINE_NETWORK = train.define_network


def softmax_head_network(input_shape, num_classes, cfg) -> keras.Model:
    """The example network's features under a fork's own K-unit softmax head, uncompiled."""
    example = EXAMPLE_DEFINE_NETWORK(input_shape, num_classes, cfg)
    features = example.get_layer("probabilities").input
    head = keras.layers.Dense(num_classes, activation="softmax", name="fork_head")(features)
    return keras.Model(example.inputs, head, name="fork")


FORK_NETWORKS = {"softmax2": softmax_head_network}


def pytest_configure(config):
    """An unknown TEST_FORK_HEAD stops the session before it runs anything."""
    if FORK_HEAD and FORK_HEAD not in FORK_NETWORKS:
        raise pytest.UsageError(
            f"TEST_FORK_HEAD={FORK_HEAD!r}: expected one of {sorted(FORK_NETWORKS)}"
        )


@pytest.fixture(autouse=True, scope="session")
def fork_head():
    """train.define_network replaced for the whole session when TEST_FORK_HEAD names a head
    (so lifecycle's validate, predict and serve, which call train's hooks, see it too)."""
    if not FORK_HEAD:
        yield None
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "define_network", FORK_NETWORKS[FORK_HEAD])
        yield FORK_HEAD


def tiny_config(**overrides) -> train.Config:
    """A Config that trains in seconds on 32x32 synthetic images, with nothing downloaded."""
    defaults = dict(
        data_source="demo",
        demo_samples=48,
        image_size=32,
        convolutions=1,
        dense_units=8,
        epochs=1,
        batch_size=8,
        randomize_images=False,
        experiment_name="tests",
        registered_model_name="tiny-classifier",
        export_savedmodel=False,
    )
    return dataclasses.replace(train.Config(), **{**defaults, **overrides})


def engine_config(**overrides) -> RunConfig:
    """The engine's own knobs only, no train.py: 32x32 images in batches of 8.

    For tests of engine code that call the built-in sources directly, so they hold
    whatever a fork makes of train.py.
    """
    return RunConfig(**{"image_size": 32, "batch_size": 8, **overrides})


def train_and_log(cfg: train.Config) -> TrainResult:
    """One whole run of train.py's Config, load_data and define_network, as main() does."""
    return run_training(cfg, train.load_data, train.define_network)


@contextlib.contextmanager
def module_store(uri: str):
    """MLFLOW_TRACKING_URI set to uri (and no MLFLOW_RUN_ID) for a module-scoped fixture,
    which monkeypatch cannot serve; the environment is put back afterwards."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_RUN_ID", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield uri
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def no_active_experiment(monkeypatch):
    """Each test starts and ends with no active MLflow experiment.

    mlflow.set_experiment (lifecycle.validate calls it) keeps the experiment in a module
    global and in os.environ["MLFLOW_EXPERIMENT_ID"]; left there, a later test on a new
    store would start runs in an experiment that store does not have.
    """
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")  # undone at the end: back to unset
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)


@pytest.fixture(autouse=True, scope="session")
def image_cache_in_tmp(tmp_path_factory):
    """The tests' decoded-image cache is a temporary folder, not the project's or /storage's."""
    root = tmp_path_factory.mktemp("image-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(image_cache, "default_cache_dir", lambda: root)
        yield root


@pytest.fixture
def tracking_store(tmp_path, monkeypatch) -> str:
    """A fresh local sqlite tracking store for one test; returns its URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts); yields its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(
        backend_store_uri=f"sqlite:///{root / 'mlflow.db'}",
        artifacts_destination=str(root / "artifacts"),
        log_path=root / "server.log",
    ).start()
    yield server.url
    server.stop()


@pytest.fixture
def demo_dir(tmp_path):
    """48 synthetic 32x32 PNGs in two class folders."""
    directory = tmp_path / "cells"
    make_demo_data(directory, samples=48, image_size=32, seed=1)
    return directory


# The host tests' fakes: commands on PATH (docker, nvidia-smi, ...) and an HTTP server.
@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    return host_fakes.fake_bin(tmp_path, monkeypatch)


@pytest.fixture
def http_server():
    with host_fakes.http_server() as url:
        yield url
