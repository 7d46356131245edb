"""Sweeps: the grid from -P or YAML, parameter names checked against MLproject, and
the scheduler (through the launcher, with a fake `mlflow` start): runs in parallel, one
GPU each, failures reported, a failed run retried by resuming it, the results table."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
import yaml

import project_driver
from engine.common import CHECKPOINT_STATE, PROJECT_DIR
from engine.config import UserError
from host.facts import GpuInfo
from host.plan import Plan
from host.sweep import (
    check_param_names,
    expand_grid,
    format_table,
    load_grid_file,
    parse_param_values,
    run_sweep,
)
from tests import host_fakes

NO_GPU = GpuInfo(runtime=False, count=0)


# ---------------------------------------------------------------------------
# Sweeps: grid from -P or YAML, parameter names, the scheduler, the table
# ---------------------------------------------------------------------------


def test_grid_from_command_line_expands_to_every_combination():
    grid = parse_param_values(["epochs=1,2", "learning_rate=0.001, 0.01", "seed=7"])
    assert grid == {"epochs": ["1", "2"], "learning_rate": ["0.001", "0.01"], "seed": ["7"]}
    points = expand_grid(grid)
    assert points == [
        {"epochs": "1", "learning_rate": "0.001", "seed": "7"},
        {"epochs": "1", "learning_rate": "0.01", "seed": "7"},
        {"epochs": "2", "learning_rate": "0.001", "seed": "7"},
        {"epochs": "2", "learning_rate": "0.01", "seed": "7"},
    ]


@pytest.mark.parametrize("item", ["epochs", "=1,2", "epochs=1,,2", "epochs="])
def test_bad_grid_items_are_rejected(item):
    with pytest.raises(UserError, match="-P"):
        parse_param_values([item])


def test_grid_from_yaml_file(tmp_path):
    grid_file = tmp_path / "sweep.yaml"
    grid_file.write_text(
        "parameters:\n  data_source: demo\n  epochs: [1, 2]\n  xla: [true, false]\n"
        "  learning_rate: [0.001]\n"
    )
    grid = load_grid_file(grid_file)
    assert grid == {
        "data_source": ["demo"],
        "epochs": ["1", "2"],
        "xla": ["true", "false"],
        "learning_rate": ["0.001"],
    }
    assert len(expand_grid(grid)) == 4


def test_sweep_parameters_must_exist_in_mlproject():
    spec = yaml.safe_load((PROJECT_DIR / "MLproject").read_text())
    known = list(spec["entry_points"]["main"]["parameters"])
    check_param_names([{"epochs": "1", "learning_rate": "0.1"}], known)
    with pytest.raises(UserError, match="unknown parameter.*epoch\\b"):
        check_param_names([{"epoch": "1"}], known)


class FakeMlflowRun:
    """Stands in for a sweep run's `mlflow run` process: running for a few polls, then
    its exit code."""

    def __init__(self, code, polls):
        self.code, self.polls = code, polls

    def poll(self):
        self.polls -= 1
        return None if self.polls > 0 else self.code


def launched_run(argv):
    """The -P values and the run id of an `mlflow run` argv."""
    params = dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "-P")
    return params, argv[argv.index("--run-id") + 1]


def test_sweep_scheduler_runs_in_parallel_one_gpu_each_and_reports_failures(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("sweep")
    launched, running_gpus, peak = [], set(), [0]

    def create_run(params):  # as create_run_first, before each launch
        return client.create_run(experiment, tags={"epochs": params["epochs"]}).info.run_id

    def fake_start(argv, env):
        assert argv[:2] == ["run", str(PROJECT_DIR)]  # started, not waited for
        docker_args = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-A")
        gpu = docker_args["gpus"]
        assert gpu not in running_gpus, "two runs on one GPU at once"
        running_gpus.add(gpu)
        peak[0] = max(peak[0], len(running_gpus))
        parameters, run_id = launched_run(argv)
        launched.append((parameters, docker_args))
        # the run's final metric, as train.py logs it
        client.log_metric(run_id, "val_accuracy", 0.5 + float(parameters["learning_rate"]))
        code = 1 if parameters["epochs"] == "2" else 0
        process = FakeMlflowRun(code, polls=len(launched) % 3 + 1)
        original = process.poll

        def poll():
            status = original()
            if status is not None:
                running_gpus.discard(gpu)
            return status

        process.poll = poll
        return process

    points = expand_grid({"epochs": ["1", "2"], "learning_rate": ["0.1", "0.2", "0.3"]})
    plan = Plan("sqlite:///unused", {"network": "host", "gpus": "all"}, project=str(PROJECT_DIR))
    rows = run_sweep(
        points,
        plan,
        GpuInfo(runtime=True, count=2),
        "auto",
        parallel=2,
        create_run=create_run,
        poll_seconds=0.01,
        start=fake_start,
    )
    assert len(launched) == 6 and peak[0] == 2
    assert {args["gpus"] for _, args in launched} == {"device=0", "device=1"}
    assert all(args["network"] == "host" for _, args in launched)
    assert [row["status"] for row in rows] == ["FINISHED"] * 3 + ["FAILED"] * 3
    assert [row["learning_rate"] for row in rows] == ["0.1", "0.2", "0.3"] * 2
    assert rows[1]["val_accuracy"] == pytest.approx(0.7)
    table = format_table(rows)
    assert table.splitlines()[0].split() == [
        "epochs",
        "learning_rate",
        "run_id",
        "status",
        "val_accuracy",
    ]
    assert len(table.splitlines()) == 2 + 6 and "FAILED" in table


def test_sweep_without_values_and_with_unknown_names_exits_2_before_launching(capsys):
    assert project_driver.main(["sweep"]) == 2
    assert "nothing to sweep" in capsys.readouterr().err
    assert project_driver.main(["sweep", "-P", "epoch=1,2"]) == 2
    assert "unknown parameter(s) epoch" in capsys.readouterr().err


def test_a_sweep_retries_a_failed_run_by_resuming_it(tracking_store, tmp_path):
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("sweep-retries")
    launches = []

    def create_run(params):
        return client.create_run(experiment).info.run_id

    def fake_start(argv, env):
        parameters, run_id = launched_run(argv)
        launches.append((parameters, run_id))
        if len(launches) == 1:  # the first launch dies after checkpointing
            folder = tmp_path / "ckpt" / run_id
            folder.mkdir(parents=True)
            (folder / CHECKPOINT_STATE).write_text("{}")
            client.set_tag(run_id, "checkpoint_dir", str(folder))
            return FakeMlflowRun(1, polls=1)
        return FakeMlflowRun(0, polls=1)

    plan = Plan(tracking_store, run_args=["--experiment-name", "sweep-retries"])
    sweep = {"plan": plan, "gpus": NO_GPU, "gpu_setting": "auto", "parallel": 1}
    rows = run_sweep(
        [{"epochs": "2"}, {"epochs": "3"}],
        **sweep,
        create_run=create_run,
        poll_seconds=0.01,
        retries=1,
        start=fake_start,
    )
    assert [row["status"] for row in rows] == ["FINISHED", "FINISHED"]
    failed_id = rows[0]["run_id"]
    # the retry went first, into the same run, with resume_run_id; then the next point
    assert launches == [
        ({"epochs": "2"}, failed_id),
        ({"epochs": "2", "resume_run_id": failed_id}, failed_id),
        ({"epochs": "3"}, rows[1]["run_id"]),
    ]
    rows = run_sweep(
        [{"epochs": "2"}],
        **sweep,
        create_run=create_run,
        poll_seconds=0.01,
        retries=0,
        start=fake_start,
    )
    assert rows[0]["status"] == "FINISHED"  # the fake fails only its first launch ever


@pytest.mark.slow
def test_the_driver_creates_each_sweep_run_first_then_starts_it(
    tmp_path, monkeypatch, mlflow_server
):
    """`project_driver.py sweep` against a real server, with fake `docker` and `mlflow`:
    each run exists with its parameters before its `mlflow run --run-id` starts."""
    bin_dir = host_fakes.fake_bin(tmp_path, monkeypatch)
    host_fakes.fake_docker(bin_dir, {"runc": {}})
    calls = tmp_path / "calls.txt"
    host_fakes.fake_command(bin_dir, "mlflow", f'echo "$@" >> "{calls}"\n')
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "STORAGE_DIR": str(tmp_path)}
    env["MLFLOW"] = str(bin_dir / "mlflow")
    env.pop("GPUS", None)
    sweep = ["sweep", "-P", "epochs=1,2", "--parallel", "2", "--experiment-name", "driver-sweep"]
    done = subprocess.run(
        [sys.executable, "project_driver.py", *sweep],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    header = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["epochs", "run_id", "status"]
    )
    rows = [
        dict(zip(["epochs", "run_id", "status"], line.split(), strict=True))
        for line in lines[header + 2 :]
    ]
    assert [row["epochs"] for row in rows] == ["1", "2"]
    assert [row["status"] for row in rows] == ["FINISHED", "FINISHED"]
    client = mlflow.MlflowClient(mlflow_server)
    started = calls.read_text().splitlines()
    for row in rows:
        run = client.get_run(row["run_id"])
        assert run.data.params["epochs"] == row["epochs"]
        assert run.data.tags["mlflow.source.type"] == "PROJECT"
        assert client.get_experiment(run.info.experiment_id).name == "driver-sweep"
        assert sum(f"--run-id {row['run_id']}" in call for call in started) == 1
    assert f"[1/2] + mlflow run {PROJECT_DIR} -A network=host" in done.stdout
