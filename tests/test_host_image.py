"""The image: one tag (MLproject, the Makefile and the driver agree), one tag per code
version, the build command, the base a rebuild keeps, the Dockerfile's layers, and the
Kubernetes Job that MLflow's own code renders from kubernetes/."""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from engine.common import PROJECT_DIR
from host.image import build_command, code_image_tag, previous_base, read_image_tag
from tests.host_fakes import fake_command

# ---------------------------------------------------------------------------
# One image tag: MLproject, the Makefile and the driver agree
# ---------------------------------------------------------------------------


def test_make_build_builds_the_tag_written_in_mlproject_and_one_per_code_version():
    tag = read_image_tag()
    assert tag and ":" in tag
    with_base = subprocess.run(
        ["make", "-s", "-n", "build", "BASE_IMAGE=debian:bookworm"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "BASE_IMAGE=debian:bookworm" in with_base and "project_driver.py build" in with_base
    identity = {"commit": "c0ffee" * 6 + "abcd", "dirty": False, "content_hash": "ab12" * 16}
    command = build_command(PROJECT_DIR, tag, identity, "debian:bookworm")
    repository = tag.rsplit(":", 1)[0]
    assert command[:6] == ["docker", "build", "-t", tag, "-t", f"{repository}:code-{'ab12' * 3}"]
    assert command[-1] == str(PROJECT_DIR)
    build_args = dict(
        command[i + 1].split("=", 1) for i, arg in enumerate(command) if arg == "--build-arg"
    )
    assert build_args == {
        "BASE_IMAGE": "debian:bookworm",
        "CODE_COMMIT": identity["commit"],
        "CODE_DIRTY": "false",
        "CODE_CONTENT_HASH": identity["content_hash"],
        "CODE_IMAGE": f"{repository}:code-{'ab12' * 3}",
    }
    # Without BASE_IMAGE the Dockerfile's own base is used.
    assert "BASE_IMAGE" not in " ".join(build_command(PROJECT_DIR, tag, identity))


def test_code_tag_keeps_a_registry_port_and_path():
    assert code_image_tag("reg:5000/team/img:latest", "f" * 64) == (
        "reg:5000/team/img:code-ffffffffffff"
    )
    assert code_image_tag("reg:5000/img", "f" * 64) == "reg:5000/img:code-ffffffffffff"


def test_make_help_lists_the_docker_targets():
    listing = subprocess.run(
        ["make", "-s", "help"], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
    ).stdout
    listed = {re.sub(r"\x1b\[[0-9;]*m", "", line).split()[0] for line in listing.splitlines()}
    assert {"build", "run", "sweep", "kube-run", "test-docker"} <= listed


def test_dockerfile_base_is_pinned_and_overridable():
    dockerfile = (PROJECT_DIR / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu\nFROM ${BASE_IMAGE}" in dockerfile
    requirements = (PROJECT_DIR / "requirements.txt").read_text()
    assert "tensorflow==2.21.0" in requirements  # the base's TensorFlow, so pip keeps it
    # The project code is the last thing copied, so editing it rebuilds one layer; only
    # the identity (labels, the bake step that checks the hash) comes after it.
    copies = [line for line in dockerfile.splitlines() if line.startswith("COPY")]
    assert copies[-1].endswith(" . .")
    after_copy = dockerfile.split(copies[-1])[1]
    assert "LABEL code.commit=" in after_copy and "engine.provenance bake" in after_copy


def test_a_rebuild_keeps_the_base_the_image_was_built_on(fake_bin):
    fake_command(fake_bin, "docker", "echo py-tf2-base:bookworm-py311\n")
    assert previous_base("img:latest") == "py-tf2-base:bookworm-py311"
    fake_command(fake_bin, "docker", "echo '<no value>'\n")  # an image without the label
    assert previous_base("img:latest") == ""
    fake_command(fake_bin, "docker", "exit 1\n")  # no image yet
    assert previous_base("img:latest") == ""


# ---------------------------------------------------------------------------
# Kubernetes: the job MLflow's own code renders from kubernetes/
# ---------------------------------------------------------------------------


def test_kubernetes_job_asks_for_a_gpu_and_carries_image_command_and_tracking(monkeypatch):
    pytest.importorskip("kubernetes", reason="pip install kubernetes (tests/requirements.txt)")
    from mlflow.projects import _parse_kubernetes_config
    from mlflow.projects import kubernetes as kb
    from mlflow.projects.utils import get_entry_point_command, get_run_env_vars, load_project

    monkeypatch.chdir(PROJECT_DIR)  # the config names the template relative to the project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://localhost:5000")
    monkeypatch.setenv("KUBE_MLFLOW_TRACKING_URI", "http://mlflow.mlflow.svc:5000")
    config = json.loads((PROJECT_DIR / "kubernetes" / "kubernetes_config.json").read_text())
    kube_config = _parse_kubernetes_config(config)
    project = load_project(str(PROJECT_DIR))
    command = get_entry_point_command(project, "main", {"epochs": "3"}, None)
    env_vars = get_run_env_vars(run_id="abc123", experiment_id="7")

    job = kb._get_kubernetes_job_definition(
        project.name,
        config["repository-uri"] + ":1a2b3c4",
        "sha256:" + "0" * 64,
        kb._get_run_command(command),
        env_vars,
        kube_config["kube-job-template"],
    )
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == config["repository-uri"] + ":1a2b3c4@sha256:" + "0" * 64
    assert container["command"][:2] == ["python", "train.py"]
    assert container["command"][container["command"].index("--epochs") + 1] == "3"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc:5000"
    assert env["MLFLOW_RUN_ID"] == "abc123" and env["MLFLOW_EXPERIMENT_ID"] == "7"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert job["metadata"]["namespace"]


def test_kube_run_with_workers_renders_an_indexed_job_and_a_headless_service(monkeypatch, tmp_path):
    """make kube-run WORKERS=3: MLflow's own code renders an Indexed Job of 3 pods under
    the headless Service, and each pod's entry step makes its TF_CONFIG."""
    pytest.importorskip("kubernetes", reason="pip install kubernetes (tests/requirements.txt)")
    from mlflow.projects import _parse_kubernetes_config
    from mlflow.projects import kubernetes as kb

    from engine.multiworker import cluster_from_env
    from host import kube

    assert kube.write_config(1, tmp_path) == kube.BACKEND_CONFIG  # one worker: today's Job
    config = json.loads(kube.write_config(3, tmp_path / "rendered").read_text())
    job = kb._get_kubernetes_job_definition(
        "proj",
        config["repository-uri"] + ":1a2b3c4",
        "sha256:" + "0" * 64,
        ["python", "train.py"],
        {"MLFLOW_RUN_ID": "abc123"},
        _parse_kubernetes_config(config)["kube-job-template"],
    )
    spec = job["spec"]
    assert (spec["completions"], spec["parallelism"], spec["completionMode"]) == (3, 3, "Indexed")
    service = kube.headless_service(kube.project_name(), job["metadata"]["namespace"])
    pod = spec["template"]
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["MLFLOW_RUN_ID"] == "abc123" and env["TRAIN_WORKERS"] == "3"

    # the entry step, in pod 0 and pod 2 of a Job MLflow named at submit time
    env = {k: v for k, v in env.items() if v is not None}
    hosts = [
        f"{job['metadata']['name']}-{i}.{env['TRAIN_WORKER_SUBDOMAIN']}:2222" for i in range(3)
    ]
    for index in (0, 2):
        pod_env = {**env, "JOB_NAME": job["metadata"]["name"], "JOB_COMPLETION_INDEX": str(index)}
        cluster = cluster_from_env(pod_env)
        assert (cluster.workers, cluster.index) == (hosts, index)
        assert json.loads(pod_env["TF_CONFIG"])["task"] == {"type": "worker", "index": index}


STUDY_DB = "postgresql://tuner@db.example/studies"


def test_kube_tune_renders_an_indexed_job_of_tuning_workers(monkeypatch, tmp_path):
    """make kube-tune WORKERS=3: `mlflow run --backend kubernetes` of the tuning worker,
    whose Job template MLflow's own code renders as 3 pods, each with the study's
    settings and its own worker number."""
    pytest.importorskip("kubernetes", reason="pip install kubernetes (tests/requirements.txt)")
    from mlflow.projects import _parse_kubernetes_config
    from mlflow.projects import kubernetes as kb
    from mlflow.projects.utils import get_entry_point_command, load_project

    from host.tune import TUNE_ENTRY, KubeWorkers

    settings = {"storage": STUDY_DB, "parent_run_id": "p1", "base": {"experiment_name": "e"}}
    argv, _ = KubeWorkers(3, PROJECT_DIR, tmp_path).command(0, json.dumps(settings))
    assert argv[1:5] == ["run", str(PROJECT_DIR), "--backend", "kubernetes"]
    assert argv[argv.index("-e") + 1] == TUNE_ENTRY and "--build-image" in argv
    assert argv[argv.index("--experiment-name") + 1] == "e"
    config = json.loads(Path(argv[argv.index("--backend-config") + 1]).read_text())

    monkeypatch.chdir(PROJECT_DIR)
    project = load_project(str(PROJECT_DIR))
    command = get_entry_point_command(project, TUNE_ENTRY, {}, None)
    job = kb._get_kubernetes_job_definition(
        project.name,
        config["repository-uri"] + ":1a2b3c4",
        "sha256:" + "0" * 64,
        kb._get_run_command(command),
        {"MLFLOW_RUN_ID": "job-run"},
        _parse_kubernetes_config(config)["kube-job-template"],
    )
    spec = job["spec"]
    assert (spec["completions"], spec["parallelism"], spec["completionMode"]) == (3, 3, "Indexed")
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["python", TUNE_ENTRY]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # a GPU per worker
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert json.loads(env["TUNE_SETTINGS"]) == settings and env["MLFLOW_RUN_ID"] == "job-run"
    # tuning workers share only the study: no training cluster, no Service
    assert "TRAIN_WORKERS" not in env and "subdomain" not in pod

    # each pod is the worker of its index
    entry = runpy.run_path(str(PROJECT_DIR / TUNE_ENTRY))  # not __main__: defines, runs nothing
    for index in ("0", "2"):
        assert entry["worker_argv"]({"JOB_COMPLETION_INDEX": index}) == ["worker", "-", index]


@pytest.mark.parametrize(
    ("workers", "storage", "tracking", "says"),
    [
        ("two", STUDY_DB, "http://mlflow:5000", "WORKERS must be a positive whole number"),
        ("2", "/storage/tune/studies.journal", "http://mlflow:5000", "the team PostgreSQL"),
        ("2", "sqlite:///studies.db", "http://mlflow:5000", "the team PostgreSQL"),
        ("2", STUDY_DB, "sqlite:///mlflow.db", "the pods need a tracking server"),
    ],
)
def test_kube_tune_refuses_bad_input_before_building_anything(
    fake_bin, tmp_path, workers, storage, tracking, says
):
    calls = tmp_path / "docker-calls"
    fake_command(fake_bin, "docker", f'echo "$@" >> "{calls}"\n')
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
    env.pop("KUBE_MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [sys.executable, "-m", "host.tune", "--workers", workers, "--out", str(tmp_path)]
        + ["--storage", storage, "--trials", "4"],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert says in done.stderr and "\n" not in done.stderr.strip()
    assert not calls.exists(), "an image was built before the input was checked"


@pytest.mark.parametrize("workers", ["0", "two", "-1", ""])
def test_workers_must_be_a_positive_whole_number(workers, capsys):
    from host import kube

    with pytest.raises(SystemExit) as err:
        kube.main(["config", "--workers", workers])
    assert err.value.code == 2
    assert "WORKERS must be a positive whole number" in capsys.readouterr().err


def test_project_name_is_a_valid_kubernetes_name():
    """MLflow names the Job and its container after MLproject's `name`; Kubernetes
    accepts only lowercase letters, digits and '-' there (an '_' fails at submit time)."""
    from mlflow.projects.utils import load_project

    name = load_project(str(PROJECT_DIR)).name
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), (
        f"MLproject name {name!r} is not a valid Kubernetes name: use '-' instead of '_'"
    )
