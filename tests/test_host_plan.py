"""The host's facts and the plan of a run, without Docker: GPU args, the tracking URI
and the network that reaches it, the user and storage mounts, the user's own -A, and the
plan as the data project_driver.bash reads (fake `docker` and `nvidia-smi` on PATH, a
throwaway HTTP server)."""

from __future__ import annotations

import subprocess
import time

import pytest

from engine.config import UserError
from host import facts
from host.facts import GpuInfo
from host.launch import Job
from host.plan import (
    IMAGE_UID,
    Plan,
    container_tracking,
    docker_arg_flags,
    docker_arg_words,
    gpu_docker_args,
    make_plan,
    run_gpu_args,
    user_docker_arg_names,
)
from host.run import plan_data
from tests.host_fakes import fake_command, fake_docker
from tests.servers import free_port

NO_GPU = GpuInfo(runtime=False, count=0)
ONE_GPU = GpuInfo(runtime=True, count=1)


# ---------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------


def test_gpu_runtime_present_passes_gpus_all():
    args, line = gpu_docker_args("auto", GpuInfo(runtime=True, count=2))
    assert args == {"gpus": "all"}
    assert "--gpus all" in line and "2 GPU(s)" in line


def test_no_gpu_runtime_runs_on_cpu_and_says_so_in_one_line():
    args, line = gpu_docker_args("auto", NO_GPU)
    assert args == {}
    assert "CPU" in line and "\n" not in line


def test_gpus_without_container_runtime_point_to_the_check_doc():
    args, line = gpu_docker_args("auto", GpuInfo(runtime=False, count=1))
    assert args == {}
    assert "doc/check_gpu_docker.md" in line and "CPU" in line


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("none", {}), ("all", {"gpus": "all"}), ("device=1", {"gpus": "device=1"})],
)
def test_gpus_setting_overrides_detection(setting, expected):
    assert gpu_docker_args(setting, ONE_GPU if setting == "none" else NO_GPU)[0] == expected


def test_detect_gpus_reads_docker_runtimes_and_nvidia_smi(fake_bin):
    fake_docker(fake_bin, {"runc": {"path": "runc"}})
    assert facts.detect_gpus() == GpuInfo(runtime=False, count=0)

    fake_docker(fake_bin, {"nvidia": {"path": "nvidia-container-runtime"}, "runc": {}})
    fake_command(
        fake_bin,
        "nvidia-smi",
        "echo 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n",
    )
    assert facts.detect_gpus() == GpuInfo(runtime=True, count=2)


def test_sweep_gives_each_concurrent_run_its_own_gpu():
    four = GpuInfo(runtime=True, count=4)
    assert [run_gpu_args(slot, four, "auto") for slot in range(4)] == [
        {"gpus": f"device={n}"} for n in range(4)
    ]
    assert run_gpu_args(0, ONE_GPU, "auto") == {"gpus": "all"}
    assert run_gpu_args(1, NO_GPU, "auto") == {}
    assert run_gpu_args(3, four, "none") == {}


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
    new_uri, args, line = container_tracking(uri, "auto", "172.17.0.1")
    assert new_uri == uri
    assert args == {"network": "host"}
    assert "--network host" in line


def test_bridge_mode_rewrites_loopback_to_the_gateway_keeping_port_and_path():
    new_uri, args, line = container_tracking(
        "https://localhost:5443/mlflow", "bridge", "172.17.0.1"
    )
    assert new_uri == "https://172.17.0.1:5443/mlflow"
    assert args == {}
    assert "rewritten" in line and "172.17.0.1" in line


@pytest.mark.parametrize("uri", ["http://mlflow.example.org:5000", "https://10.1.2.3"])
def test_remote_server_is_left_alone(uri):
    assert container_tracking(uri, "auto", "172.17.0.1")[:2] == (uri, {})


def test_non_server_uri_is_left_to_mlflow():
    uri = "sqlite:////tmp/mlflow.db"
    new_uri, args, line = container_tracking(uri, "auto", "172.17.0.1")
    assert (new_uri, args) == (uri, {})
    assert "not a server" in line


def test_unknown_network_mode_is_an_error():
    with pytest.raises(UserError, match="auto, host or bridge"):
        container_tracking("http://localhost:5000", "overlay", "172.17.0.1")


def test_unreachable_server_fails_in_seconds_with_the_fix():
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        facts.check_server(f"http://127.0.0.1:{free_port()}", timeout=3)
    assert time.monotonic() - started < 5
    assert "unreachable" in str(error.value) and "make server" in str(error.value)


def test_reachable_server_passes(http_server):
    facts.check_server(http_server)


# ---------------------------------------------------------------------------
# The whole plan: user, storage, no secrets, the user's own -A wins
# ---------------------------------------------------------------------------


def plan_for(environ, uid=1234, gid=5678, given=()):
    return make_plan(environ, NO_GPU, "172.17.0.1", uid, gid, given)


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
    assert plan.docker_args["user"] == f"{IMAGE_UID}:{IMAGE_UID}"


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
    given = user_docker_arg_names(["-P", "epochs=2", "-A", "u=0:0", "--docker-args=gpus=all"])
    assert given == ["u", "gpus"]
    plan = make_plan(
        {"MLFLOW_TRACKING_URI": "http://localhost:5000", "GPUS": "all"}, ONE_GPU, "", 7, 7, given
    )
    assert "user" not in plan.docker_args and "gpus" not in plan.docker_args
    assert plan.docker_args["network"] == "host"


def test_plan_data_keeps_every_value_intact_for_bash():
    """The plan reaches project_driver.bash as NUL-separated data, any value intact."""
    plan = Plan("http://h:5000/a b", {"gpus": "device=0,1", "rm": True})
    plan.run_args = ["-P", "run_name=a b"]
    plan.project, plan.cleanup = "/tmp/v 1/project", "/tmp/v 1"
    read = (
        "mapfile -d '' plan; args=(\"${plan[@]:2}\"); "
        'printf "%s|" "${plan[0]}" "${args[@]:1}" "${plan[1]}"; echo; echo "${args[0]}"'
    )
    out = subprocess.run(
        ["bash", "-c", read],
        input=plan_data(plan, Job(run_id="x")),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == (
        "http://h:5000/a b|/tmp/v 1/project|-A|gpus=device=0,1|-A|rm|"
        "-P|run_name=a b|--run-id|x|/tmp/v 1|\nrun\n"
    )


def test_one_formatter_spells_docker_args_for_mlflow_run_and_docker_run():
    docker_args = {"gpus": "device=0", "network": "host", "rm": True}
    assert docker_arg_words(docker_args) == ["gpus=device=0", "network=host", "rm"]
    assert docker_arg_flags(docker_args) == [
        "-A",
        "gpus=device=0",
        "-A",
        "network=host",
        "-A",
        "rm",
    ]
