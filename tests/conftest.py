"""Shared fixtures: tiny generated data and real, temporary tracking stores."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path

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
from engine.common import PROJECT_DIR
from engine.config import RunConfig
from engine.sources import make_demo_data
from engine.training import TrainResult, run_training
from host.image import read_image_tag
from host.plan import IMAGE_UID
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


# ---------------------------------------------------------------------------
# Docker: an engine (started here when installed but not running), the training image
# built on a base that can be reached, a /storage folder; used by tests/test_docker_*.py
# ---------------------------------------------------------------------------

DEFAULT_BASE = "tensorflow/tensorflow:2.21.0-gpu"
LOCAL_BASE = "py-tf2-base:bookworm-py311"


def say(config: pytest.Config, line: str) -> None:
    """Timings go to pytest's terminal output even when it captures the tests' output."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\n[docker e2e] {line}")


def docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def docker_engine(tmp_path_factory, pytestconfig):
    """A running Docker engine: the one there is, or a dockerd this module starts and stops."""
    if shutil.which("docker") is None:
        pytest.skip("Docker is not installed (Debian: apt-get install docker.io)")
    if docker_answers():
        yield
        return
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        pytest.skip("Docker is installed but not running, and this user cannot start dockerd")
    log = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(
            ["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 60
    while not docker_answers():
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.terminate()
            pytest.skip(f"dockerd did not start here: {log.read_text()[-600:]}")
        time.sleep(1)
    say(pytestconfig, f"started dockerd (pid {daemon.pid})")
    yield
    daemon.terminate()  # exactly the daemon started above
    daemon.wait(timeout=60)


def base_image(config: pytest.Config) -> str:
    """The Dockerfile's base when it is here or can be pulled, else the local Debian base."""
    inspect = ["docker", "image", "inspect", DEFAULT_BASE]
    if subprocess.run(inspect, capture_output=True).returncode == 0:
        return DEFAULT_BASE
    try:
        pulled = subprocess.run(["docker", "pull", DEFAULT_BASE], capture_output=True, timeout=900)
        if pulled.returncode == 0:
            return DEFAULT_BASE
    except subprocess.TimeoutExpired:
        pass
    started = time.monotonic()
    said = make_local_base()
    say(
        config,
        f"{DEFAULT_BASE} cannot be pulled: base {LOCAL_BASE} ready in "
        f"{time.monotonic() - started:.0f} s ({said})",
    )
    return LOCAL_BASE


def make_local_base() -> str:
    """LOCAL_BASE made (or reused) without a registry by tests/docker_base.sh; its last line."""
    made = subprocess.run(
        ["bash", str(PROJECT_DIR / "tests" / "docker_base.sh"), LOCAL_BASE],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    return made.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def training_image(docker_engine, pytestconfig) -> dict[str, str]:
    """`make build` on a reachable base; Docker's layer cache makes a rebuild take seconds."""
    base = base_image(pytestconfig)
    build_args = [] if base == DEFAULT_BASE else [f"BASE_IMAGE={base}"]
    started = time.monotonic()
    built = subprocess.run(
        ["make", "-s", "build", *build_args],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    say(pytestconfig, f"make build {' '.join(build_args)}: {time.monotonic() - started:.0f} s")
    tag = read_image_tag()
    image_id = subprocess.run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", tag],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return {"tag": tag, "id": image_id, "make_args": " ".join(build_args), "base": base}


@pytest.fixture
def storage(tmp_path) -> Path:
    """A data folder owned by the user the container runs as (as a user's /storage is)."""
    folder = tmp_path / "storage"
    folder.mkdir()
    if os.geteuid() == 0:
        os.chown(folder, IMAGE_UID, IMAGE_UID)
    return folder


def run_in_project(
    command: list[str],
    mlflow_server: str,
    storage: Path,
    cwd: Path = PROJECT_DIR,
    expect_ok: bool = True,
    base: str = "",
) -> tuple[str, float]:
    """Run a command in a project folder against the server; its output and seconds."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "STORAGE_DIR": str(storage)}
    # not a sub-make of `make test ARGS=...`: make exports its command line's variables
    # (ARGS among them) into the environment, where this make's targets would read them
    outer = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES", "ARGS")
    for name in ("MLFLOW_RUN_ID", "GPUS", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", *outer):
        env.pop(name, None)
    if base:
        env["BASE_IMAGE"] = "" if base == DEFAULT_BASE else base
    started = time.monotonic()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert (done.returncode == 0) is expect_ok, output[-6000:]
    return output, time.monotonic() - started


def run_id_in(output: str) -> str:
    """The run id that train.py prints at its end."""
    return next(line.split()[-1] for line in output.splitlines() if line.startswith("run_id:"))
