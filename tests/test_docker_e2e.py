"""The Docker path end to end: build the training image, start a real MLflow server on
loopback, `make run` one epoch on tiny demo data in the container, and check on the
server what a user would: the run FINISHED, per-epoch metrics, artifacts, a registered
model version, the image and the code it ran. Then a two-run sweep through
project_driver.py, and, in a fresh git repository of this code: an edit committed without
a rebuild (the driver builds it; a hand-typed `mlflow run .` stops before training), a
version from a bare git repository, and `make run` after a quickstart-like local run,
through `make server` on the same folder, with no experiment named.

Where Docker Hub cannot be reached, the image is built on a small Debian base made by
tests/docker_base.sh (debootstrap + docker import), cached by tag. Docker is started
when it is installed but not running (as root); the tests skip only where Docker cannot
run at all. Run them with `make test-docker` (or pytest -m docker).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine import provenance
from engine.common import PROJECT_DIR
from host.artifacts import local_folder
from host.checkout import checkout_version
from host.image import code_image_tag
from host.plan import IMAGE_UID
from tests.conftest import DEFAULT_BASE, run_id_in, run_in_project, say
from tests.servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.docker]

TINY_RUN = [
    "-P",
    "data_source=demo",
    "-P",
    "demo_samples=60",
    "-P",
    "image_size=32",
    "-P",
    "convolutions=1",
    "-P",
    "batch_size=16",
    "-P",
    "epochs=1",
]


def seconds_until(command: list[str], marker: str, env: dict, cwd: Path) -> tuple[str, float]:
    """Run a command to its end; its output and the seconds until a line held `marker`."""
    started, seen = time.monotonic(), None
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watchdog = threading.Timer(900, process.kill)
    watchdog.start()
    lines = []
    for line in process.stdout:
        lines.append(line)
        if seen is None and marker in line:
            seen = time.monotonic() - started
    process.wait()
    watchdog.cancel()
    output = "".join(lines)
    assert process.returncode == 0 and seen is not None, output[-6000:]
    return output, seen


def assert_ran_the_code(run, folder: Path) -> None:
    """The run's tags name the commit and content it ran, and agree with MLflow's."""
    identity = provenance.code_identity(folder)
    tags = run.data.tags
    assert tags["code.commit"] == identity["commit"] == tags["mlflow.source.git.commit"]
    assert tags["code.content_hash"] == identity["content_hash"]
    assert tags["code.dirty"] == str(identity["dirty"]).lower()
    assert tags["code.image"].endswith(f":code-{identity['content_hash'][:12]}")
    assert tags["git_commit"] == identity["commit"]


def test_image_holds_the_code_and_nothing_it_should_not(training_image):
    listing = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            training_image["tag"],
            "sh",
            "-c",
            "id -u; pwd; ls -A; git --version",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert listing[0] != "0", "the image must not run as root"
    assert listing[1] == "/mlflow/projects/code"
    assert {"train.py", "MLproject", "requirements.txt", "project_driver.py"} <= set(listing)
    assert {"engine", provenance.BAKED_FILE} <= set(listing)
    assert not {".venv", ".git", "tests", "data", "mlruns", "mlflow.db"} & set(listing)
    assert "git" in listing  # MLflow finds git, so no GitPython warnings

    # The image knows its code: labels and the baked file agree with the host's hash.
    identity = provenance.code_identity(PROJECT_DIR)
    labels = subprocess.run(
        [
            "docker",
            "image",
            "inspect",
            "--format",
            "{{json .Config.Labels}}",
            training_image["tag"],
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f'"code.content_hash":"{identity["content_hash"]}"' in labels
    assert f'"code.commit":"{identity["commit"]}"' in labels
    code_tag = code_image_tag(training_image["tag"], identity["content_hash"])
    baked = subprocess.run(
        ["docker", "run", "--rm", code_tag, "cat", provenance.BAKED_FILE],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert identity["content_hash"] in baked and identity["commit"] in baked


def test_make_run_trains_in_docker_and_logs_to_the_loopback_server(
    training_image, mlflow_server, storage, pytestconfig
):
    from mlflow import MlflowClient

    data_dir = storage / "demo"
    # run_name keeps its default (''): MLflow logs string params shell-quoted ("''"),
    # and train.py must not fail re-logging them under `mlflow run`.
    args = [*TINY_RUN, "-P", f"data_dir={data_dir}", "-P", "registered_model_name=docker-e2e"]
    output, elapsed = run_in_project(
        [
            "make",
            "-s",
            "run",
            training_image["make_args"],
            "EXPERIMENT=docker-e2e",
            "ARGS=" + " ".join(args),
        ],
        mlflow_server,
        storage,
    )
    say(pytestconfig, f"make run, 1 epoch on 60 demo images: {elapsed:.0f} s")

    # The driver said what it decided, one line each.
    assert "the container shares the host network (--network host)" in output
    assert "GPU: " in output and f"storage: {storage} is mounted" in output
    run_id = run_id_in(output)

    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "docker-e2e"
    assert run.data.tags["mlflow.project.env"] == "docker"
    assert run.data.tags["mlflow.docker.image.uri"] == training_image["tag"]
    assert run.data.tags["mlflow.docker.image.id"] == training_image["id"]
    assert_ran_the_code(run, PROJECT_DIR)
    assert run.data.params["epochs"] == "1"
    for metric in ("loss", "val_loss", "val_accuracy"):
        history = client.get_metric_history(run_id, metric)
        assert [point.step for point in history] == [1], metric  # one value per epoch

    artifacts = {item.path for item in client.list_artifacts(run_id)}
    assert artifacts, "no artifacts uploaded through the server"
    versions = client.search_model_versions("name='docker-e2e'")
    assert [version.run_id for version in versions] == [run_id]

    # The container wrote the demo images into the mounted folder as a non-root user.
    written = [path for path in data_dir.rglob("*.png")]
    assert len(written) == 60
    owner = os.getuid() or IMAGE_UID
    assert {path.stat().st_uid for path in written} == {owner}


def test_sweep_runs_two_containers_at_once_and_prints_the_table(
    training_image, mlflow_server, storage, pytestconfig
):
    data_dir = storage / "sweep-demo"
    output, elapsed = run_in_project(
        [
            sys.executable,
            "project_driver.py",
            "sweep",
            "--parallel",
            "2",
            "--experiment-name",
            "docker-sweep",
            *TINY_RUN,
            "-P",
            f"data_dir={data_dir}",
            "-P",
            "learning_rate=0.01,0.001",
            "-P",
            "run_name=sweep",
            "-P",
            "registered_model_name=docker-sweep",
        ],
        mlflow_server,
        storage,
    )
    say(pytestconfig, f"sweep of 2 runs, 2 at once: {elapsed:.0f} s")
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if {"run_id", "status"} <= set(line.split()))
    table = lines[start:]
    header = table[0].split()
    assert {"learning_rate", "run_id", "status", "val_accuracy"} <= set(header)
    rows = [dict(zip(header, line.split(), strict=False)) for line in table[2:4]]
    assert [row["learning_rate"] for row in rows] == ["0.01", "0.001"]
    assert [row["status"] for row in rows] == ["FINISHED", "FINISHED"]

    # Both ran in the experiment, and at the same time (their run windows overlap).
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    runs = [client.get_run(row["run_id"]).info for row in rows]
    assert {client.get_experiment(run.experiment_id).name for run in runs} == {"docker-sweep"}
    first, second = sorted(runs, key=lambda run: run.start_time)
    assert second.start_time < first.end_time, "the two runs did not overlap"


# ---------------------------------------------------------------------------
# The code a run executes is the code its tags name (a fresh repository of this code)
# ---------------------------------------------------------------------------


def git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def commit_all(folder: Path, message: str) -> str:
    git(folder, "add", "-A")
    git(folder, "-c", "user.name=e2e", "-c", "user.email=e2e@test", "commit", "-qm", message)
    return git(folder, "rev-parse", "HEAD")


@pytest.fixture
def fork(tmp_path) -> Path:
    """A fresh git repository of this code, as a fork's clone would be, sharing the venv.

    The files keep their times, so make does not reinstall the venv (-o keeps it anyway).
    """
    folder = tmp_path / "fork"
    listed = git(PROJECT_DIR, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    for name in filter(None, listed):
        source = PROJECT_DIR / name
        if source.is_file() and not source.is_symlink():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    (folder / ".venv").symlink_to(Path(sys.prefix))
    git(folder, "init", "-q")
    commit_all(folder, "the code under test")
    return folder


MAKE = ["make", "-s", "-o", ".venv/.installed"]


def test_an_edit_runs_at_once_and_a_stale_image_stops_a_hand_typed_run(
    training_image, mlflow_server, storage, fork, pytestconfig
):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    run_in_project([*MAKE, "build"], mlflow_server, storage, fork, base=training_image["base"])
    (fork / "train.py").write_text((fork / "train.py").read_text() + "# an edit\n")
    edited = commit_all(fork, "an edit, committed, not built")

    # By hand: MLflow tags the new commit, the image holds the old one: stop, no training.
    output, _ = run_in_project(
        [
            str(fork / ".venv/bin/mlflow"),
            "run",
            ".",
            "-A",
            "network=host",
            "--experiment-name",
            "stale",
            *TINY_RUN,
        ],
        mlflow_server,
        storage,
        fork,
        expect_ok=False,
    )
    assert "the image is stale" in output and f"tagged commit {edited[:12]}" in output
    stale = client.search_runs([client.get_experiment_by_name("stale").experiment_id])
    assert [run.info.status for run in stale] == ["FAILED"]
    assert not stale[0].data.metrics and "code.commit" not in stale[0].data.tags

    # Through the driver: the image is built for the edit (seconds) and the run runs it.
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "STORAGE_DIR": str(storage)}
    env["BASE_IMAGE"] = "" if training_image["base"] == DEFAULT_BASE else training_image["base"]
    output, to_training = seconds_until(
        ["./project_driver.bash", "--experiment-name", "edited", *TINY_RUN],
        "training for 1 epoch",
        env,
        fork,
    )
    say(
        pytestconfig,
        f"edit committed, driver builds and starts: training after {to_training:.0f} s",
    )
    run = client.get_run(run_id_in(output))
    assert run.info.status == "FINISHED"
    assert run.data.tags["code.commit"] == edited
    assert_ran_the_code(run, fork)


def test_a_version_from_a_git_repository_runs_with_the_same_provenance(
    training_image, mlflow_server, storage, fork, tmp_path
):
    from mlflow import MlflowClient

    version = git(fork, "rev-parse", "HEAD")
    bare = tmp_path / "fork.git"
    git(tmp_path, "clone", "-q", "--bare", str(fork), str(bare))
    (fork / "train.py").write_text((fork / "train.py").read_text() + "# a later commit\n")
    commit_all(fork, "a later commit")
    git(fork, "push", "-q", str(bare), "HEAD")
    run_in_project([*MAKE, "build"], mlflow_server, storage, fork, base=training_image["base"])

    # The image now holds the later commit; the driver builds the version asked for.
    output, _ = run_in_project(
        [
            *MAKE,
            "run",
            f"GIT_URL={bare.as_uri()}",
            f"VERSION={version}",
            "EXPERIMENT=git-version",
            "ARGS=" + " ".join(TINY_RUN),
        ],
        mlflow_server,
        storage,
        fork,
        base=training_image["base"],
    )
    assert f"is commit {version}" in output
    run = MlflowClient(mlflow_server).get_run(run_id_in(output))
    assert run.info.status == "FINISHED"
    assert run.data.tags["code.commit"] == run.data.tags["mlflow.source.git.commit"] == version
    assert run.data.tags["mlflow.source.git.repoURL"] == bare.as_uri()
    checkout = tmp_path / "checkout"
    checkout_version(bare.as_uri(), version, checkout)
    assert_ran_the_code(run, checkout)
    started = next(line for line in output.splitlines() if line.startswith("+ mlflow run "))
    assert not Path(started.split()[3]).exists(), "the driver's checkout was not removed"


def test_make_run_after_quickstart_through_make_server_lands_the_artifacts(
    training_image, storage, fork, pytestconfig
):
    """A new user's path: quickstart, make server, make run. Long because it is one story
    whose steps depend on each other (the store quickstart made is the one make run uses)."""
    from mlflow import MlflowClient

    # What `make quickstart` does, smaller: train.py with no tracking server creates
    # mlflow.db and its Default experiment, whose artifacts live in the folder mlruns/0.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    subprocess.run(
        [
            str(fork / ".venv/bin/python"),
            "train.py",
            "--data-source",
            "demo",
            "--demo-samples",
            "40",
            "--image-size",
            "32",
            "--convolutions",
            "1",
            "--epochs",
            "1",
            "--experiment-name",
            "quickstart",
        ],
        cwd=fork,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    port = free_port()
    started = subprocess.run(
        [*MAKE, "server", f"MLFLOW_PORT={port}"],
        cwd=fork,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    server = f"http://127.0.0.1:{port}"
    try:
        output, elapsed = run_in_project(
            [*MAKE, "run", "ARGS=" + " ".join(TINY_RUN)],
            server,
            storage,
            fork,
            base=training_image["base"],
        )
        say(pytestconfig, f"make run into quickstart's Default experiment: {elapsed:.0f} s")
        assert "keeps artifacts in the local folder" in output
        client = MlflowClient(server)
        run = client.get_run(run_id_in(output))
        assert run.info.status == "FINISHED"
        experiment = client.get_experiment(run.info.experiment_id)
        assert experiment.name == "Default"
        assert_ran_the_code(run, fork)
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert {"model_summary.txt", "plots"} <= artifacts
        run_folder = local_folder(run.info.artifact_uri)
        assert (run_folder / "model_summary.txt").is_file()
        models = Path(experiment.artifact_location) / "models"  # MLflow 3's logged models
        assert list(models.glob("*/artifacts/MLmodel")), "the logged model did not land"
    finally:
        subprocess.run([*MAKE, "server-stop", f"MLFLOW_PORT={port}"], cwd=fork, timeout=60)
