"""`make run WORKERS=2` on Docker: two containers on one user-defined Docker network,
each with its TF_CONFIG, started by the same launcher as `make run`, train one model
into ONE MLflow run on a real tracking server: the run FINISHED, each epoch's metrics
logged once, system metrics from both workers' node ids, one registered version.

The containers reach each other by name on the network, so they cannot share the
host's: the server listens on every address and the run uses DOCKER_NETWORK=bridge
(the containers reach it through the Docker bridge gateway). The Docker engine, the
training image and the storage folder are tests/conftest.py's fixtures, shared with
tests/test_docker_e2e.py.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from engine.sources import make_demo_data
from tests.conftest import run_id_in, run_in_project, say
from tests.servers import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.docker]

EPOCHS = 2


@pytest.fixture(scope="module")
def bridge_server(tmp_path_factory) -> str:
    """A real `mlflow server` listening on every address (the containers on a Docker
    network reach it through the bridge gateway); yields its loopback URL."""
    root = tmp_path_factory.mktemp("mlflow-bridge-server")
    server = MlflowServer(
        backend_store_uri=f"sqlite:///{root / 'mlflow.db'}",
        artifacts_destination=str(root / "artifacts"),
        log_path=root / "server.log",
        extra_args=("--host=0.0.0.0",),  # the last --host wins
    ).start()
    yield server.url
    server.stop()


@pytest.fixture
def worker_network(docker_engine) -> str:
    """The name of a Docker network for this test's workers, removed afterwards (the
    driver creates it)."""
    name = f"mlflow-workers-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["docker", "network", "rm", name], capture_output=True, check=False)


def containers_on(network: str) -> list[str]:
    """The ids of the containers, running or not, attached to a Docker network."""
    listed = ["docker", "ps", "-aq", "--filter", f"network={network}"]
    return subprocess.run(listed, capture_output=True, text=True, check=True).stdout.split()


def test_make_run_with_two_workers_trains_one_run_on_a_docker_network(
    training_image, bridge_server, storage, worker_network, monkeypatch, pytestconfig
):
    from mlflow import MlflowClient

    # made here, not by the demo source in each container: two writers of one folder race
    data_dir = storage / "images"
    make_demo_data(data_dir, samples=60, image_size=32, seed=1)
    args = [
        *("-P data_source=imagedir", f"-P data_dir={data_dir}", "-P image_size=32"),
        *("-P convolutions=1", "-P batch_size=8", f"-P epochs={EPOCHS}", "-P cache=false"),
        "-P registered_model_name=docker-workers",
    ]
    monkeypatch.setenv("DOCKER_NETWORK", "bridge")
    monkeypatch.setenv("DOCKER_WORKER_NETWORK", worker_network)
    output, elapsed = run_in_project(
        [
            "make",
            "-s",
            "run",
            training_image["make_args"],
            "WORKERS=2",
            "EXPERIMENT=docker-workers",
            "ARGS=" + " ".join(args),
        ],
        bridge_server,
        storage,
    )
    say(pytestconfig, f"make run WORKERS=2, {EPOCHS} epochs on 60 images: {elapsed:.0f} s")

    # both containers started into one run, on the network, found by their names
    starts = [line for line in output.splitlines() if "+ mlflow run" in line]
    assert [line.split()[0] for line in starts] == ["[worker", "[worker"], output[-4000:]
    assert all(f"network={worker_network}" in line for line in starts)
    run_ids = {line.split("--run-id ")[1].split()[0] for line in starts}
    assert len(run_ids) == 1
    (run_id,) = run_ids
    assert run_id_in(output) == run_id  # the chief's summary names the same run
    assert "worker 0 of 2" in output and "worker 1 of 2" in output

    client = MlflowClient(bridge_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["replicas"] == "2"
    assert run.data.params["global_batch_size"] == "16"
    assert run.data.params["distribute_strategy"] == "CollectiveAllReduceStrategy"
    for metric in ("loss", "val_loss", "val_accuracy"):
        steps = [point.step for point in client.get_metric_history(run_id, metric)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (metric, steps)  # each epoch once
    # (system metrics from each node id: tests/test_multiworker.py, which samples every
    # second; a container samples every 10 s, longer than this run's training)
    versions = client.search_model_versions("name='docker-workers'")
    assert [version.run_id for version in versions] == [run_id]
    assert not containers_on(worker_network), "a worker's container was left behind"
