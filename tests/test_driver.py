"""The Docker driver's decisions, without Docker: GPU args, tracking URI, user and
storage mounts, the sweep grid and scheduler, the bash wrapper (run against fake
`docker` and `mlflow` commands), the Makefile's image tag, and the Kubernetes job
that MLflow's own code renders from kubernetes/."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import yaml

import project_driver as driver
from engine import provenance
from engine.config import UserError
from project_driver import GpuInfo

PROJECT_DIR = Path(driver.__file__).resolve().parent
NO_GPU = GpuInfo(runtime=False, count=0)
ONE_GPU = GpuInfo(runtime=True, count=1)


# ---------------------------------------------------------------------------
# helpers: a throwaway HTTP server, a free port, fake commands on PATH
# ---------------------------------------------------------------------------


# What the fake server says about an experiment: its artifacts go through the server.
SERVER_EXPERIMENT = {
    "experiment": {
        "experiment_id": "0",
        "name": "Default",
        "artifact_location": "mlflow-artifacts:/0",
        "lifecycle_stage": "active",
    }
}


@pytest.fixture
def http_server():
    """A loopback HTTP server that answers every GET with 200 OK (and MLflow's experiment
    API with an experiment whose artifacts go through the server); yields its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            if "experiment_name=missing" in self.path:
                self.send_response(404)
                self.end_headers()
                self.wfile.write(b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}')
                return
            self.send_response(200)
            self.end_headers()
            if "/mlflow/experiments/" in self.path:
                self.wfile.write(json.dumps(SERVER_EXPERIMENT).encode())
            else:
                self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_command(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(script))
    path.chmod(0o755)


@pytest.fixture
def fake_bin(tmp_path, monkeypatch):
    """A folder first on PATH for fake commands; `python` in it runs this interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_command(bin_dir, "python", f'exec "{sys.executable}" "$@"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def fake_docker(bin_dir: Path, runtimes: dict) -> None:
    """`docker info --format '{{json .Runtimes}}'` prints these runtimes."""
    fake_command(bin_dir, "docker", f"echo '{json.dumps(runtimes)}'\n")


# ---------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------


def test_gpu_runtime_present_passes_gpus_all():
    args, line = driver.gpu_docker_args("auto", GpuInfo(runtime=True, count=2))
    assert args == {"gpus": "all"}
    assert "--gpus all" in line and "2 GPU(s)" in line


def test_no_gpu_runtime_runs_on_cpu_and_says_so_in_one_line():
    args, line = driver.gpu_docker_args("auto", NO_GPU)
    assert args == {}
    assert "CPU" in line and "\n" not in line


def test_gpus_without_container_runtime_point_to_the_check_doc():
    args, line = driver.gpu_docker_args("auto", GpuInfo(runtime=False, count=1))
    assert args == {}
    assert "doc/check_gpu_docker.md" in line and "CPU" in line


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("none", {}), ("all", {"gpus": "all"}), ("device=1", {"gpus": "device=1"})],
)
def test_gpus_setting_overrides_detection(setting, expected):
    assert driver.gpu_docker_args(setting, ONE_GPU if setting == "none" else NO_GPU)[0] == expected


def test_detect_gpus_reads_docker_runtimes_and_nvidia_smi(fake_bin):
    fake_docker(fake_bin, {"runc": {"path": "runc"}})
    assert driver.detect_gpus() == GpuInfo(runtime=False, count=0)

    fake_docker(fake_bin, {"nvidia": {"path": "nvidia-container-runtime"}, "runc": {}})
    fake_command(
        fake_bin,
        "nvidia-smi",
        "echo 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n",
    )
    assert driver.detect_gpus() == GpuInfo(runtime=True, count=2)


def test_sweep_gives_each_concurrent_run_its_own_gpu():
    four = GpuInfo(runtime=True, count=4)
    assert [driver.run_gpu_args(slot, four, "auto") for slot in range(4)] == [
        {"gpus": f"device={n}"} for n in range(4)
    ]
    assert driver.run_gpu_args(0, ONE_GPU, "auto") == {"gpus": "all"}
    assert driver.run_gpu_args(1, NO_GPU, "auto") == {}
    assert driver.run_gpu_args(3, four, "none") == {}


# ---------------------------------------------------------------------------
# Tracking server: loopback handling and failing fast
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "http://localhost:5000",
        "http://127.0.0.1:5000",
        "http://127.0.1.1:8080/",
        "http://[::1]:5000",
    ],
)
def test_loopback_server_uses_host_network_and_keeps_the_uri(uri):
    new_uri, args, line = driver.container_tracking(uri, "auto", "172.17.0.1")
    assert new_uri == uri
    assert args == {"network": "host"}
    assert "--network host" in line


def test_bridge_mode_rewrites_loopback_to_the_gateway_keeping_port_and_path():
    new_uri, args, line = driver.container_tracking(
        "https://localhost:5443/mlflow", "bridge", "172.17.0.1"
    )
    assert new_uri == "https://172.17.0.1:5443/mlflow"
    assert args == {}
    assert "rewritten" in line and "172.17.0.1" in line


@pytest.mark.parametrize("uri", ["http://mlflow.example.org:5000", "https://10.1.2.3"])
def test_remote_server_is_left_alone(uri):
    assert driver.container_tracking(uri, "auto", "172.17.0.1")[:2] == (uri, {})


def test_non_server_uri_is_left_to_mlflow():
    uri = "sqlite:////tmp/mlflow.db"
    new_uri, args, line = driver.container_tracking(uri, "auto", "172.17.0.1")
    assert (new_uri, args) == (uri, {})
    assert "not a server" in line


def test_unknown_network_mode_is_an_error():
    with pytest.raises(UserError, match="auto, host or bridge"):
        driver.container_tracking("http://localhost:5000", "overlay", "172.17.0.1")


def test_unreachable_server_fails_in_seconds_with_the_fix():
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        driver.check_server(f"http://127.0.0.1:{free_port()}", timeout=3)
    assert time.monotonic() - started < 5
    assert "unreachable" in str(error.value) and "make server" in str(error.value)


def test_reachable_server_passes(http_server):
    driver.check_server(http_server)


# ---------------------------------------------------------------------------
# The whole plan: user, storage, no secrets, the user's own -A wins
# ---------------------------------------------------------------------------


def plan_for(environ, uid=1234, gid=5678, given=()):
    return driver.make_plan(environ, NO_GPU, "172.17.0.1", uid, gid, given)


def test_plan_without_tracking_uri_says_how_to_start_a_server():
    with pytest.raises(UserError, match="MLFLOW_TRACKING_URI is not set.*make server"):
        plan_for({})


def test_plan_runs_as_the_caller_and_mounts_storage_at_the_same_path(tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    plan = plan_for({"MLFLOW_TRACKING_URI": "http://localhost:5000", "STORAGE_DIR": str(storage)})
    assert plan.docker_args == {
        "network": "host",
        "user": "1234:5678",
        "volume": f"{storage}:{storage}",
    }
    assert len(plan.messages) == 4  # GPU, tracking, user, storage: one line each


def test_root_caller_runs_the_container_as_the_image_user():
    plan = plan_for({"MLFLOW_TRACKING_URI": "http://localhost:5000"}, uid=0, gid=0)
    assert plan.docker_args["user"] == f"{driver.IMAGE_UID}:{driver.IMAGE_UID}"


def test_missing_storage_dir_mounts_nothing(tmp_path):
    environ = {"MLFLOW_TRACKING_URI": "http://h:5000", "STORAGE_DIR": str(tmp_path / "absent")}
    plan = plan_for(environ)
    assert "volume" not in plan.docker_args
    assert any("does not exist" in line for line in plan.messages)


def test_plan_mounts_no_home_folder_or_secret(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".pgpass").write_text("db:5432:*:me:secret\n")
    monkeypatch.setenv("HOME", str(home))
    plan = plan_for({"MLFLOW_TRACKING_URI": "http://localhost:5000", "STORAGE_DIR": ""})
    mounted = " ".join(str(value) for value in plan.docker_args.values())
    assert (
        str(home) not in mounted and ".pgpass" not in mounted and "volume" not in plan.docker_args
    )


def test_a_docker_arg_the_user_gives_replaces_the_drivers():
    given = driver.user_docker_arg_names(
        ["-P", "epochs=2", "-A", "u=0:0", "--docker-args=gpus=all"]
    )
    assert given == ["u", "gpus"]
    plan = driver.make_plan(
        {"MLFLOW_TRACKING_URI": "http://localhost:5000", "GPUS": "all"}, ONE_GPU, "", 7, 7, given
    )
    assert "user" not in plan.docker_args and "gpus" not in plan.docker_args
    assert plan.docker_args["network"] == "host"


def test_shell_plan_quotes_values_for_bash():
    plan = driver.Plan("http://h:5000/a b", {"gpus": "device=0,1", "rm": True})
    plan.run_args = ["-P", "run_name=a b", "--run-id", "x"]
    plan.project, plan.cleanup = "/tmp/v 1/project", "/tmp/v 1"
    show = 'printf "%s|" "$MLFLOW_TRACKING_URI" "$project" "${docker_args[@]}" "${run_args[@]}" '
    out = subprocess.run(
        ["bash", "-c", driver.shell_plan(plan) + show + '"$cleanup"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == (
        "http://h:5000/a b|/tmp/v 1/project|-A|gpus=device=0,1|-A|rm|"
        "-P|run_name=a b|--run-id|x|/tmp/v 1|"
    )


# ---------------------------------------------------------------------------
# project_driver.bash against fake docker and mlflow (no container is started)
# ---------------------------------------------------------------------------


def run_bash_driver(fake_bin, tmp_path, uri, *args, runtimes=None):
    fake_docker(fake_bin, runtimes or {"runc": {}})  # `docker build` succeeds too
    argv_file = tmp_path / "mlflow-argv.txt"
    fake_command(
        fake_bin,
        "mlflow",
        f'printf "%s\\n" "$MLFLOW_TRACKING_URI" "$@" > "{argv_file}"\n',
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHON": str(fake_bin / "python")}
    env.pop("GPUS", None)
    env["STORAGE_DIR"] = str(tmp_path)
    started = time.monotonic()
    done = subprocess.run(
        [str(PROJECT_DIR / "project_driver.bash"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    argv = argv_file.read_text().splitlines() if argv_file.exists() else None
    return done, argv, elapsed


def test_bash_driver_runs_mlflow_run_with_the_plan_and_passes_args_through(
    fake_bin, tmp_path, http_server
):
    done, argv, _ = run_bash_driver(
        fake_bin, tmp_path, http_server, "-P", "epochs=3", "--experiment-name", "trials"
    )
    assert done.returncode == 0, done.stderr
    uid = (
        f"{os.getuid()}:{os.getgid()}" if os.getuid() else f"{driver.IMAGE_UID}:{driver.IMAGE_UID}"
    )
    content_hash = provenance.code_identity(PROJECT_DIR)["content_hash"]
    assert argv == [
        http_server,
        "run",
        ".",
        "-A",
        "network=host",
        "-A",
        f"user={uid}",
        "-A",
        f"volume={tmp_path}:{tmp_path}",
        "-A",
        f"env={provenance.EXPECTED_HASH_ENV}={content_hash}",
        "-P",
        "epochs=3",
        "--experiment-name",
        "trials",
    ]
    assert "training runs on the CPU" in done.stderr
    assert f"code {content_hash[:12]}" in done.stderr  # the image line: which code it holds


def test_bash_driver_passes_gpus_all_when_docker_has_the_nvidia_runtime(
    fake_bin, tmp_path, http_server
):
    runtimes = {"nvidia": {"path": "nvidia-container-runtime"}, "runc": {}}
    done, argv, _ = run_bash_driver(fake_bin, tmp_path, http_server, runtimes=runtimes)
    assert done.returncode == 0, done.stderr
    assert argv[3:5] == ["-A", "gpus=all"]


def test_bash_driver_stops_before_mlflow_when_the_server_is_down(fake_bin, tmp_path):
    done, argv, elapsed = run_bash_driver(fake_bin, tmp_path, f"http://localhost:{free_port()}")
    assert done.returncode == 2
    assert argv is None  # mlflow run (and so the container) never started
    assert elapsed < 20
    assert "unreachable" in done.stderr and "No container was started" in done.stderr


@pytest.mark.parametrize("target", ["run", "sweep"])
def test_make_target_stops_before_building_when_the_server_is_down(fake_bin, tmp_path, target):
    calls = tmp_path / "docker-calls.txt"
    fake_command(fake_bin, "docker", f'echo "$@" >> "{calls}"\n')
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    done = subprocess.run(
        ["make", "-s", target, "ARGS=-P epochs=1,2"],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "unreachable" in done.stderr
    assert "build" not in (calls.read_text() if calls.exists() else "")


# ---------------------------------------------------------------------------
# Sweeps: grid from -P or YAML, parameter names, the scheduler, the table
# ---------------------------------------------------------------------------


def test_grid_from_command_line_expands_to_every_combination():
    grid = driver.parse_param_values(["epochs=1,2", "learning_rate=0.001, 0.01", "seed=7"])
    assert grid == {"epochs": ["1", "2"], "learning_rate": ["0.001", "0.01"], "seed": ["7"]}
    points = driver.expand_grid(grid)
    assert points == [
        {"epochs": "1", "learning_rate": "0.001", "seed": "7"},
        {"epochs": "1", "learning_rate": "0.01", "seed": "7"},
        {"epochs": "2", "learning_rate": "0.001", "seed": "7"},
        {"epochs": "2", "learning_rate": "0.01", "seed": "7"},
    ]


@pytest.mark.parametrize("item", ["epochs", "=1,2", "epochs=1,,2", "epochs="])
def test_bad_grid_items_are_rejected(item):
    with pytest.raises(UserError, match="-P"):
        driver.parse_param_values([item])


def test_grid_from_yaml_file(tmp_path):
    grid_file = tmp_path / "sweep.yaml"
    grid_file.write_text(
        "parameters:\n  data_source: demo\n  epochs: [1, 2]\n  xla: [true, false]\n"
        "  learning_rate: [0.001]\n"
    )
    grid = driver.load_grid_file(grid_file)
    assert grid == {
        "data_source": ["demo"],
        "epochs": ["1", "2"],
        "xla": ["true", "false"],
        "learning_rate": ["0.001"],
    }
    assert len(driver.expand_grid(grid)) == 4


def test_sweep_parameters_must_exist_in_mlproject():
    spec = yaml.safe_load((PROJECT_DIR / "MLproject").read_text())
    known = list(spec["entry_points"]["main"]["parameters"])
    driver.check_param_names([{"epochs": "1", "learning_rate": "0.1"}], known)
    with pytest.raises(UserError, match="unknown parameter.*epoch\\b"):
        driver.check_param_names([{"epoch": "1"}], known)


class FakeSubmittedRun:
    """Stands in for mlflow's LocalSubmittedRun: RUNNING for a few polls, then final."""

    def __init__(self, run_id, final, polls):
        self.run_id, self.final, self.polls = run_id, final, polls

    def get_status(self):
        self.polls -= 1
        return "RUNNING" if self.polls > 0 else self.final


def test_sweep_scheduler_runs_in_parallel_one_gpu_each_and_reports_failures(tmp_path, monkeypatch):
    import mlflow
    import mlflow.projects

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("sweep")  # not whichever experiment an earlier test left active
    launched, running_gpus, peak = [], set(), [0]

    def fake_run(uri, entry_point, parameters, docker_args, experiment_name, synchronous):
        assert synchronous is False and entry_point == "main" and uri == str(PROJECT_DIR)
        gpu = docker_args["gpus"]
        assert gpu not in running_gpus, "two runs on one GPU at once"
        running_gpus.add(gpu)
        peak[0] = max(peak[0], len(running_gpus))
        launched.append((dict(parameters), dict(docker_args)))
        with mlflow.start_run() as run:  # a real run with a final metric, as train.py logs
            mlflow.log_metric("val_accuracy", 0.5 + float(parameters["learning_rate"]))
        final = "FAILED" if parameters["epochs"] == "2" else "FINISHED"
        submitted = FakeSubmittedRun(run.info.run_id, final, polls=len(launched) % 3 + 1)
        original = submitted.get_status

        def get_status():
            status = original()
            if status != "RUNNING":
                running_gpus.discard(gpu)
            return status

        submitted.get_status = get_status
        return submitted

    monkeypatch.setattr(mlflow.projects, "run", fake_run)
    points = driver.expand_grid({"epochs": ["1", "2"], "learning_rate": ["0.1", "0.2", "0.3"]})
    rows = driver.run_sweep(
        points,
        {"network": "host", "gpus": "all"},
        GpuInfo(runtime=True, count=2),
        "auto",
        parallel=2,
        experiment_name=None,
        poll_seconds=0.01,
    )
    assert len(launched) == 6 and peak[0] == 2
    assert {args["gpus"] for _, args in launched} == {"device=0", "device=1"}
    assert all(args["network"] == "host" for _, args in launched)
    assert [row["status"] for row in rows] == ["FINISHED"] * 3 + ["FAILED"] * 3
    assert [row["learning_rate"] for row in rows] == ["0.1", "0.2", "0.3"] * 2
    assert rows[1]["val_accuracy"] == pytest.approx(0.7)
    table = driver.format_table(rows)
    assert table.splitlines()[0].split() == [
        "epochs",
        "learning_rate",
        "run_id",
        "status",
        "val_accuracy",
    ]
    assert len(table.splitlines()) == 2 + 6 and "FAILED" in table


def test_sweep_without_values_and_with_unknown_names_exits_2_before_launching(capsys):
    assert driver.main(["sweep"]) == 2
    assert "nothing to sweep" in capsys.readouterr().err
    assert driver.main(["sweep", "-P", "epoch=1,2"]) == 2
    assert "unknown parameter(s) epoch" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# One image tag: MLproject, the Makefile and the driver agree
# ---------------------------------------------------------------------------


def test_make_build_builds_the_tag_written_in_mlproject_and_one_per_code_version():
    tag = driver.read_image_tag()
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
    command = driver.build_command(PROJECT_DIR, tag, identity, "debian:bookworm")
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
    assert "BASE_IMAGE" not in " ".join(driver.build_command(PROJECT_DIR, tag, identity))


def test_code_tag_keeps_a_registry_port_and_path():
    assert driver.code_image_tag("reg:5000/team/img:latest", "f" * 64) == (
        "reg:5000/team/img:code-ffffffffffff"
    )
    assert driver.code_image_tag("reg:5000/img", "f" * 64) == "reg:5000/img:code-ffffffffffff"


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


def test_project_name_is_a_valid_kubernetes_name():
    """MLflow names the Job and its container after MLproject's `name`; Kubernetes
    accepts only lowercase letters, digits and '-' there (an '_' fails at submit time)."""
    from mlflow.projects.utils import load_project

    name = load_project(str(PROJECT_DIR)).name
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), (
        f"MLproject name {name!r} is not a valid Kubernetes name: use '-' instead of '_'"
    )


# ---------------------------------------------------------------------------
# The code's identity (engine/provenance.py): which files, which content, which commit
# ---------------------------------------------------------------------------


def git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def make_project(folder: Path, dockerignore: str, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".dockerignore").write_text(textwrap.dedent(dockerignore))
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def commit_all(folder: Path, message: str = "code") -> str:
    if not (folder / ".git").exists():
        git(folder, "init", "--quiet")
    git(folder, "add", "-A")
    git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", message)
    return git(folder, "rev-parse", "HEAD")


# Docker's rules: the last matching line wins, a line matches a file or any folder above
# it, `*` stays in one folder and `**` crosses folders, "!" lets files back in.
DOCKERIGNORE = """\
    # a comment
    *
    !.dockerignore
    !*.py
    !/MLproject
    !pkg/*.py
    !**/keep.txt
    pkg/secret.py
    tests
    .venv
    """


@pytest.mark.parametrize(
    ("path", "sent"),
    [
        ("train.py", True),
        ("MLproject", True),  # the leading "/" means the context's root, as in Docker
        ("README.md", False),
        ("pkg/model.py", True),
        ("pkg/secret.py", False),  # a later line wins over !pkg/*.py
        ("pkg/sub/deep.py", False),  # `*` in !pkg/*.py does not cross folders
        ("docs/deep/keep.txt", True),  # `**` does
        ("other/model.py", False),  # !*.py is the top folder only
        ("tests/test_x.py", False),  # `tests` leaves out everything below it
        ("tests/keep.txt", False),
    ],
)
def test_dockerignore_rules_are_dockers(tmp_path, path, sent):
    project = make_project(tmp_path / "p", DOCKERIGNORE, {path: "x\n"})
    assert (path in provenance.context_files(project)) is sent


def test_context_files_are_those_the_build_sends_and_big_ignored_folders_are_not_walked(
    tmp_path, monkeypatch
):
    project = make_project(
        tmp_path / "p",
        DOCKERIGNORE,
        {
            "train.py": "print(1)\n",
            "MLproject": "name: x\n",
            "README.md": "read me\n",
            "pkg/model.py": "m = 1\n",
            "pkg/secret.py": "s = 1\n",
            "tests/test_x.py": "t = 1\n",
            ".venv/lib/site.py": "v = 1\n",
            provenance.BAKED_FILE: "{}",
        },
    )
    walked = []
    real_scandir = os.scandir
    monkeypatch.setattr(
        provenance.os, "scandir", lambda path: walked.append(Path(path).name) or real_scandir(path)
    )
    files = provenance.context_files(project)
    assert files == [".dockerignore", "MLproject", "pkg/model.py", "train.py"]
    assert "tests" not in walked and ".venv" not in walked  # nothing could be let in there


def test_this_projects_context_holds_the_code_and_no_tests_data_or_venv():
    files = provenance.context_files(PROJECT_DIR)
    assert {".dockerignore", "MLproject", "train.py", "engine/provenance.py"} <= set(files)
    assert "requirements.txt" in files and "tracking_server/requirements.txt" in files
    outside = ("tests/", ".venv/", ".git/", "data/", "mlruns/", "mlartifacts/", "outputs/")
    assert not [path for path in files if path.startswith(outside) or "__pycache__" in path]


def test_content_hash_counts_sent_files_only_and_commit_says_dirty(tmp_path):
    project = make_project(
        tmp_path / "p", DOCKERIGNORE, {"train.py": "print(1)\n", "README.md": "hi\n"}
    )
    commit = commit_all(project)
    clean = provenance.code_identity(project)
    assert clean["commit"] == commit and clean["dirty"] is False
    assert len(clean["content_hash"]) == 64

    (project / "README.md").write_text("edited, but not in the image\n")
    assert provenance.code_identity(project) == clean

    (project / "train.py").write_text("print(2)\n")  # an uncommitted edit counts
    edited = provenance.code_identity(project)
    assert edited["commit"] == commit and edited["dirty"] is True
    assert edited["content_hash"] != clean["content_hash"]

    (project / "train.py").write_text("print(1)\n")
    (project / "new.py").write_text("x = 1\n")  # so does a new file the build would send
    assert provenance.code_identity(project)["dirty"] is True
    (project / "new.py").unlink()
    assert provenance.code_identity(project) == clean


def test_in_the_image_the_commit_comes_from_the_baked_file_while_the_code_is_unchanged(
    tmp_path,
):
    project = make_project(tmp_path / "p", DOCKERIGNORE, {"train.py": "print(1)\n"})
    commit = commit_all(project)
    host = provenance.code_identity(project)
    image = tmp_path / "image"  # the code as COPY puts it into the image: no .git
    make_project(image, DOCKERIGNORE, {"train.py": "print(1)\n"})
    assert provenance.code_identity(image)["commit"] == provenance.UNKNOWN

    baked = provenance.bake(image, commit, False, host["content_hash"], "img:code-x")
    assert baked["content_hash"] == host["content_hash"]
    assert provenance.code_identity(image) == host  # same hash, commit and dirty flag

    (image / "train.py").write_text("print('changed in the container')\n")
    assert provenance.code_identity(image)["commit"] == provenance.UNKNOWN


def test_bake_stops_when_the_image_received_other_files_than_the_host_hashed(tmp_path):
    image = make_project(tmp_path / "image", DOCKERIGNORE, {"train.py": "print(1)\n"})
    with pytest.raises(UserError, match="other code.*Files in the image"):
        provenance.bake(image, "abc", False, "0" * 64, "img:code-0")
    assert not (image / provenance.BAKED_FILE).exists()
    assert provenance.main(["bake", "--project-dir", str(image), "--content-hash", "1"]) == 2


# ---------------------------------------------------------------------------
# At run start: the run stops before training when the image is stale
# ---------------------------------------------------------------------------

A, B = "a" * 40, "b" * 40
IN_IMAGE = {"commit": A, "dirty": False, "content_hash": "1" * 64}
BAKED = {**IN_IMAGE, "image": "img:code-111111111111"}


def test_the_code_the_run_is_tagged_with_runs():
    assert provenance.mismatch(IN_IMAGE, A, IN_IMAGE["content_hash"], BAKED) is None
    assert provenance.mismatch(IN_IMAGE, None, None, None) is None  # no commit to check


def test_a_stale_image_stops_the_run_saying_what_it_holds_and_how_to_rebuild():
    message = provenance.mismatch(IN_IMAGE, B, None, BAKED)
    assert f"tagged commit {B[:12]}" in message and f"commit {A[:12]}" in message
    assert "img:code-111111111111" in message and "make run" in message


def test_code_other_than_the_driver_built_stops_the_run():
    message = provenance.mismatch(IN_IMAGE, A, "2" * 64, BAKED)
    assert "222222222222" in message and "another build replaced the image" in message


@pytest.mark.parametrize(
    ("baked", "says"),
    [
        (None, "no code identity"),
        ({**BAKED, "content_hash": "3" * 64}, "differs from the code baked into the image"),
        ({**BAKED, "commit": "unknown"}, "without its git commit"),
    ],
)
def test_code_of_unknown_commit_stops_a_run_tagged_with_a_commit(baked, says):
    present = {**IN_IMAGE, "commit": provenance.UNKNOWN}
    assert says in provenance.mismatch(present, A, None, baked)


def test_check_and_tag_tags_the_code_a_run_runs_or_fails_it(tmp_path, monkeypatch):
    import mlflow

    project = make_project(tmp_path / "p", DOCKERIGNORE, {"train.py": "print(1)\n"})
    commit = commit_all(project)
    monkeypatch.delenv(provenance.EXPECTED_HASH_ENV, raising=False)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())

    run = client.create_run(experiment, tags={"mlflow.source.git.commit": commit})
    code = provenance.check_and_tag(run.info.run_id, project, client)
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["code.commit"] == code["commit"] == commit
    assert tags["code.content_hash"] == code["content_hash"] and tags["code.dirty"] == "false"

    stale = client.create_run(experiment, tags={"mlflow.source.git.commit": B})
    with pytest.raises(UserError, match="the image is stale"):
        provenance.check_and_tag(stale.info.run_id, project, client)
    assert "code.commit" not in client.get_run(stale.info.run_id).data.tags


# ---------------------------------------------------------------------------
# A version from git
# ---------------------------------------------------------------------------


def test_version_options_are_the_drivers_and_the_rest_goes_to_mlflow():
    url, version, rest = driver.split_version_args(
        ["--git-url", "file:///r.git", "-P", "epochs=1", "--version=abc", "--run-name", "x"]
    )
    assert (url, version, rest) == ("file:///r.git", "abc", ["-P", "epochs=1", "--run-name", "x"])
    assert driver.split_version_args(["-v", "main"])[1] == "main"
    with pytest.raises(UserError, match="--git-url needs a value"):
        driver.split_version_args(["--git-url"])


def test_checkout_of_a_version_from_a_bare_repository(tmp_path):
    project = make_project(tmp_path / "p", DOCKERIGNORE, {"train.py": "print(1)\n"})
    first = commit_all(project, "first")
    (project / "train.py").write_text("print(2)\n")
    commit_all(project, "second")
    bare = tmp_path / "fork.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(project), str(bare)], check=True)

    checkout = tmp_path / "checkout"
    assert driver.checkout_version(bare.as_uri(), first, checkout) == first
    assert (checkout / "train.py").read_text() == "print(1)\n"
    assert provenance.code_identity(checkout)["commit"] == first
    with pytest.raises(UserError, match="checkout"):
        driver.checkout_version(bare.as_uri(), "no-such-version", tmp_path / "other")


# ---------------------------------------------------------------------------
# Artifacts in a local folder (experiments made without a server, e.g. by quickstart)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "folder"),
    [
        ("/p/mlruns/0", Path("/p/mlruns/0")),
        ("file:///p/ml%20runs/0", Path("/p/ml runs/0")),
        ("mlruns/0", driver.PROJECT_DIR / "mlruns/0"),
        ("mlflow-artifacts:/0", None),
        ("s3://bucket/0", None),
    ],
)
def test_local_artifact_folders_are_recognised(location, folder):
    assert driver.local_folder(location) == folder


def test_the_experiment_is_found_as_mlflow_run_picks_it(http_server):
    found = driver.find_experiment(http_server, ["--experiment-name", "trials"], {})
    assert found["artifact_location"] == "mlflow-artifacts:/0"
    # Not there yet: mlflow run creates it through the server, so nothing to prepare.
    assert driver.find_experiment(http_server, ["--experiment-name=missing"], {}) is None
    environ = {"MLFLOW_EXPERIMENT_NAME": "missing"}
    assert driver.find_experiment(http_server, [], environ) is None
    assert driver.find_experiment(http_server, ["--experiment-id", "0"], environ) is not None


def test_a_local_experiment_folder_is_mounted_and_the_run_made_first_owned_by_its_user(
    tmp_path,
):
    import mlflow

    project = tmp_path / "project"
    project.mkdir()
    for name in ("MLproject", "train.py"):  # what MLflow's project loader reads
        (project / name).write_text((PROJECT_DIR / name).read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    folder = tmp_path / "mlruns" / "0"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("local", artifact_location=str(folder))

    plan = driver.Plan(uri, {"user": "1000:1000"})
    args = ["-P", "epochs=2", "--experiment-name", "local"]
    options = driver.local_artifacts(plan, project, args)
    owner = f"{folder.stat().st_uid}:{folder.stat().st_gid}"
    assert plan.docker_args == {
        "user": owner,  # the folder's owner, root included, replaces the driver's choice
        "mount": f"type=bind,source={folder},target={folder}",
    }
    assert "keeps artifacts in the local folder" in plan.messages[-1]

    run_id = driver.create_run_first(project, options, options["parameters"], owner)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.params["epochs"] == "2"
    assert run.data.tags["mlflow.source.type"] == "PROJECT"
    run_folder = Path(run.info.artifact_uri)
    assert run_folder.is_dir() and f"{run_folder.stat().st_uid}:{run_folder.stat().st_gid}" == owner

    # An experiment made through the server (or not made yet) needs nothing.
    plan = driver.Plan(uri, {"user": "1000:1000"})
    assert driver.local_artifacts(plan, project, ["--experiment-name", "new"]) is None
    assert plan.docker_args == {"user": "1000:1000"}


def test_a_rebuild_keeps_the_base_the_image_was_built_on(fake_bin):
    fake_command(fake_bin, "docker", "echo py-tf2-base:bookworm-py311\n")
    assert driver.previous_base("img:latest") == "py-tf2-base:bookworm-py311"
    fake_command(fake_bin, "docker", "echo '<no value>'\n")  # an image without the label
    assert driver.previous_base("img:latest") == ""
    fake_command(fake_bin, "docker", "exit 1\n")  # no image yet
    assert driver.previous_base("img:latest") == ""


# ---------------------------------------------------------------------------
# Retries: a failed run is resumed from its checkpoint, or started over
# ---------------------------------------------------------------------------


def _fail_first_mlflow(fake_bin: Path, calls: Path, checkpoints: Path | None) -> None:
    """A fake `mlflow` that records its arguments and fails its first call; with
    checkpoints, that first call leaves a checkpoint and the tag training sets."""
    lines = [
        f"#!{sys.executable}",
        "import json, pathlib, sys",
        "argv = sys.argv[1:]",
        f"calls = pathlib.Path({str(calls)!r})",
        "first = not calls.exists()",
        "calls.open('a').write(json.dumps(argv) + '\\n')",
        "if not first:",
        "    sys.exit(0)",
    ]
    if checkpoints is not None:
        lines += [
            "run_id = argv[argv.index('--run-id') + 1]",
            f"folder = pathlib.Path({str(checkpoints)!r}) / run_id",
            "folder.mkdir(parents=True)",
            "(folder / 'state.json').write_text('{}')",
            "from mlflow import MlflowClient",
            "MlflowClient().set_tag(run_id, 'checkpoint_dir', str(folder))",
        ]
    (fake_bin / "mlflow").write_text("\n".join([*lines, "sys.exit(1)", ""]))
    (fake_bin / "mlflow").chmod(0o755)


def _bash_with_retries(fake_bin, tmp_path, uri, retries: str):
    fake_docker(fake_bin, {"runc": {}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHON": str(fake_bin / "python"),
           "STORAGE_DIR": str(tmp_path), "RETRIES": retries}  # fmt: skip
    env.pop("GPUS", None)
    return subprocess.run(
        [str(PROJECT_DIR / "project_driver.bash"), "-P", "epochs=3",
         "--experiment-name", "retries"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


@pytest.mark.slow
def test_make_run_retries_resume_a_failed_run_into_the_same_run(fake_bin, tmp_path, mlflow_server):
    calls = tmp_path / "calls.jsonl"
    _fail_first_mlflow(fake_bin, calls, tmp_path / "checkpoints")
    done = _bash_with_retries(fake_bin, tmp_path, mlflow_server, "1")
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in calls.read_text().splitlines())
    run_id = first[first.index("--run-id") + 1]  # created first, so a retry can name it
    assert second[second.index("--run-id") + 1] == run_id
    assert f"resume_run_id={run_id}" in second
    assert "retry 1 of 1" in done.stderr and f"resuming run {run_id}" in done.stderr


@pytest.mark.slow
def test_make_run_retries_start_over_without_a_checkpoint_and_stop_at_the_count(
    fake_bin, tmp_path, mlflow_server
):
    calls = tmp_path / "calls.jsonl"
    _fail_first_mlflow(fake_bin, calls, None)
    done = _bash_with_retries(fake_bin, tmp_path, mlflow_server, "2")
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in calls.read_text().splitlines())
    assert second[second.index("--run-id") + 1] != first[first.index("--run-id") + 1]
    assert not any(arg.startswith("resume_run_id=") for arg in second)
    assert "left no checkpoint here; starting it over" in done.stderr

    calls.unlink()
    (fake_bin / "mlflow").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit 3\n')
    done = _bash_with_retries(fake_bin, tmp_path, mlflow_server, "1")
    assert done.returncode == 3 and len(calls.read_text().splitlines()) == 2
    assert "error: RETRIES must be" in _bash_with_retries(fake_bin, tmp_path, mlflow_server,
                                                          "two").stderr  # fmt: skip


def test_a_sweep_retries_a_failed_run_by_resuming_it(tracking_store, tmp_path, monkeypatch):
    import mlflow
    import mlflow.projects

    client = mlflow.MlflowClient()
    experiment = client.create_experiment("sweep-retries")
    launches = []

    class Submitted:
        def __init__(self, run_id, status):
            self.run_id, self.status = run_id, status

        def get_status(self):
            return self.status

    def fake_run(uri, entry_point, parameters, docker_args, experiment_name, synchronous,
                 run_id=None):  # fmt: skip
        launches.append((dict(parameters), run_id))
        run_id = run_id or client.create_run(experiment).info.run_id
        if len(launches) == 1:  # the first launch dies after checkpointing
            folder = tmp_path / "ckpt" / run_id
            folder.mkdir(parents=True)
            (folder / driver.CHECKPOINT_STATE).write_text("{}")
            client.set_tag(run_id, "checkpoint_dir", str(folder))
            return Submitted(run_id, "FAILED")
        return Submitted(run_id, "FINISHED")

    monkeypatch.setattr(mlflow.projects, "run", fake_run)
    rows = driver.run_sweep([{"epochs": "2"}, {"epochs": "3"}], {}, NO_GPU, "auto", 1,
                            "sweep-retries", poll_seconds=0.01, retries=1)  # fmt: skip
    assert [row["status"] for row in rows] == ["FINISHED", "FINISHED"]
    failed_id = rows[0]["run_id"]
    # the retry went first, into the same run, with resume_run_id; then the next point
    assert launches == [({"epochs": "2"}, None),
                        ({"epochs": "2", "resume_run_id": failed_id}, failed_id),
                        ({"epochs": "3"}, None)]  # fmt: skip
    rows = driver.run_sweep([{"epochs": "2"}], {}, NO_GPU, "auto", 1, "sweep-retries",
                            poll_seconds=0.01, retries=0)  # fmt: skip
    assert rows[0]["status"] == "FINISHED"  # the fake fails only its first launch ever
