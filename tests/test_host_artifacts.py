"""Artifacts in a local folder (experiments made without a server, e.g. by quickstart):
which locations are local, the experiment `mlflow run` will pick (over REST from a fake
server), and a local experiment's folder mounted with the run created first, owned by
the container's user."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from engine.common import PROJECT_DIR
from host.artifacts import create_run_first, find_experiment, local_artifacts, local_folder
from host.plan import Plan

# ---------------------------------------------------------------------------
# Artifacts in a local folder (experiments made without a server, e.g. by quickstart)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "folder"),
    [
        ("/p/mlruns/0", Path("/p/mlruns/0")),
        ("file:///p/ml%20runs/0", Path("/p/ml runs/0")),
        ("mlruns/0", PROJECT_DIR / "mlruns/0"),
        ("mlflow-artifacts:/0", None),
        ("s3://bucket/0", None),
    ],
)
def test_local_artifact_folders_are_recognised(location, folder):
    assert local_folder(location) == folder


def test_the_experiment_is_found_as_mlflow_run_picks_it(http_server):
    found = find_experiment(http_server, ["--experiment-name", "trials"], {})
    assert found["artifact_location"] == "mlflow-artifacts:/0"
    # Not there yet: mlflow run creates it through the server, so nothing to prepare.
    assert find_experiment(http_server, ["--experiment-name=missing"], {}) is None
    environ = {"MLFLOW_EXPERIMENT_NAME": "missing"}
    assert find_experiment(http_server, [], environ) is None
    assert find_experiment(http_server, ["--experiment-id", "0"], environ) is not None


def test_a_local_experiment_folder_is_mounted_and_the_run_made_first_owned_by_its_user(
    tmp_path,
):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("MLproject", "train.py"):  # what MLflow's project loader reads
        (project / name).write_text((PROJECT_DIR / name).read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "mlruns" / "0"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("local", artifact_location=str(folder))

    plan = Plan(uri, {"user": "1000:1000"})
    args = ["-P", "epochs=2", "--experiment-name", "local"]
    options = local_artifacts(plan, project, args)
    owner = f"{folder.stat().st_uid}:{folder.stat().st_gid}"
    assert plan.docker_args == {
        "user": owner,  # the folder's owner, root included, replaces the driver's choice
        "mount": f"type=bind,source={folder},target={folder}",
    }
    assert "keeps artifacts in the local folder" in plan.messages[-1]

    run_id = create_run_first(project, options, options["parameters"], owner)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.params["epochs"] == "2"
    assert run.data.tags["mlflow.source.type"] == "PROJECT"
    run_folder = Path(run.info.artifact_uri)
    assert run_folder.is_dir() and f"{run_folder.stat().st_uid}:{run_folder.stat().st_gid}" == owner

    # An experiment made through the server (or not made yet) needs nothing.
    plan = Plan(uri, {"user": "1000:1000"})
    assert local_artifacts(plan, project, ["--experiment-name", "new"]) is None
    assert plan.docker_args == {"user": "1000:1000"}
