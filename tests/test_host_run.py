"""One run, and the launcher every run goes through: project_driver.bash and
`project_driver.py run` against fake `docker` and `mlflow` commands (no container is
started), `make run` stopping before the build when the server is down, and the one
retry rule: a failed run resumed into the same run from its checkpoint, else started
over."""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from engine import provenance
from engine.common import CHECKPOINT_STATE, PROJECT_DIR
from engine.config import UserError
from host.launch import Job, Launcher
from host.plan import IMAGE_UID, Plan
from host.run import retries_setting
from tests.host_fakes import fake_command, fake_docker
from tests.servers import free_port

# ---------------------------------------------------------------------------
# project_driver.bash against fake docker and mlflow (no container is started)
# ---------------------------------------------------------------------------


def run_bash_driver(fake_bin, tmp_path, uri, *args, runtimes=None, door="bash"):
    """Run project_driver.bash (or, door="python", `project_driver.py run` as `make run`
    does); returns its result, the argv the fake `mlflow` got and the seconds taken."""
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
    command = [str(PROJECT_DIR / "project_driver.bash")]
    if door == "python":
        command = [sys.executable, str(PROJECT_DIR / "project_driver.py"), "run"]
        env["MLFLOW"] = str(fake_bin / "mlflow")
    started = time.monotonic()
    done = subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    argv = argv_file.read_text().splitlines() if argv_file.exists() else None
    return done, argv, elapsed


@pytest.mark.parametrize("door", ["bash", "python"])
def test_bash_driver_runs_mlflow_run_with_the_plan_and_passes_args_through(
    fake_bin, tmp_path, http_server, door
):
    done, argv, _ = run_bash_driver(
        fake_bin, tmp_path, http_server, "-P", "epochs=3", "--experiment-name", "trials", door=door
    )
    assert done.returncode == 0, done.stderr
    uid = f"{os.getuid()}:{os.getgid()}" if os.getuid() else f"{IMAGE_UID}:{IMAGE_UID}"
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
    assert f"+ mlflow {' '.join(argv[1:])}\n" in done.stderr  # the command, as it ran


def test_bash_driver_reads_the_plan_as_data_and_evaluates_no_code():
    script = (PROJECT_DIR / "project_driver.bash").read_text()
    assert "eval" not in script and "plan --print0" in script and "mapfile -d ''" in script


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


def _run_with_retries(fake_bin, tmp_path, uri, retries: str, door: str = "bash"):
    """The run with RETRIES, through project_driver.bash (which hands it to the launcher)
    or through `project_driver.py run` as `make run` starts it."""
    fake_docker(fake_bin, {"runc": {}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHON": str(fake_bin / "python")}
    env.update(STORAGE_DIR=str(tmp_path), RETRIES=retries, MLFLOW=str(fake_bin / "mlflow"))
    env.pop("GPUS", None)
    command = [str(PROJECT_DIR / "project_driver.bash")]
    if door == "python":
        command = [sys.executable, str(PROJECT_DIR / "project_driver.py"), "run"]
    return subprocess.run(
        [*command, "-P", "epochs=3", "--experiment-name", "retries"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.slow
def test_make_run_retries_resume_a_failed_run_into_the_same_run(fake_bin, tmp_path, mlflow_server):
    calls = tmp_path / "calls.jsonl"
    _fail_first_mlflow(fake_bin, calls, tmp_path / "checkpoints")
    done = _run_with_retries(fake_bin, tmp_path, mlflow_server, "1")
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
    done = _run_with_retries(fake_bin, tmp_path, mlflow_server, "2", door="python")
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in calls.read_text().splitlines())
    assert second[second.index("--run-id") + 1] != first[first.index("--run-id") + 1]
    assert not any(arg.startswith("resume_run_id=") for arg in second)
    assert "left no checkpoint here; starting it over" in done.stderr

    calls.unlink()
    (fake_bin / "mlflow").write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\nexit 3\n')
    done = _run_with_retries(fake_bin, tmp_path, mlflow_server, "1")
    assert done.returncode == 3 and len(calls.read_text().splitlines()) == 2
    refused = _run_with_retries(fake_bin, tmp_path, mlflow_server, "two")
    assert "error: RETRIES must be" in refused.stderr


@pytest.mark.parametrize("value", ["two", "-1", "1.5", " 1"])
def test_retries_must_be_a_whole_number(value):
    with pytest.raises(
        UserError, match=f"RETRIES must be a whole number of retries, got '{value}'"
    ):
        retries_setting(value)
    assert retries_setting(None) == retries_setting("") == 0 and retries_setting("3") == 3


# ---------------------------------------------------------------------------
# The launcher's one retry rule, with a fake `mlflow` start (no subprocess)
# ---------------------------------------------------------------------------


class FakeMlflowRun:
    """Stands in for the `mlflow run` process: running for `polls` polls, then `code`."""

    def __init__(self, code: int, polls: int = 2):
        self.code, self.polls = code, polls

    def poll(self):
        self.polls -= 1
        return None if self.polls > 0 else self.code


def test_the_launcher_resumes_a_run_with_a_checkpoint_here_and_starts_one_without_over(
    tracking_store, tmp_path, capsys
):
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("launcher")
    starts = []

    def create_run(params):
        return client.create_run(experiment).info.run_id

    def start(argv, env):  # each run's first try fails; run "a" checkpointed first
        starts.append(list(argv))
        run_id, point = argv[argv.index("--run-id") + 1], argv[argv.index("-P") + 1]
        first_try = sum(point in started for started in starts) == 1
        if first_try and point == "name=a":
            folder = tmp_path / "ckpt" / run_id
            folder.mkdir(parents=True)
            (folder / CHECKPOINT_STATE).write_text("{}")
            client.set_tag(run_id, "checkpoint_dir", str(folder))
        assert env["MLFLOW_TRACKING_URI"] == "http://h:5000"
        return FakeMlflowRun(1 if first_try else 0)

    plan = Plan("http://h:5000", {"network": "host"}, run_args=["--experiment-name", "e"])
    jobs = [Job(params={"name": "a"}, label="[a] "), Job(params={"name": "b"}, label="[b] ")]
    launcher = Launcher(plan, retries=1, create_run=create_run, start=start, poll_seconds=0.01)
    launcher.run(jobs)

    a, b = jobs
    assert [job.status for job in jobs] == ["FINISHED", "FINISHED"] and a.tries == b.tries == 1
    assert starts[0][:5] == ["run", ".", "-A", "network=host", "--experiment-name"]
    resumed = starts[1]  # a retry goes first, into the same run, told to resume it
    assert resumed[resumed.index("--run-id") + 1] == a.run_id
    assert f"resume_run_id={a.run_id}" in resumed
    first_b, over = starts[2], starts[3]  # b left no checkpoint: a new run, from scratch
    assert over[over.index("--run-id") + 1] == b.run_id != first_b[first_b.index("--run-id") + 1]
    assert not any(arg.startswith("resume_run_id=") for arg in over)
    err = capsys.readouterr().err
    assert (
        f"[a] + mlflow run . -A network=host --experiment-name e -P name=a --run-id {a.run_id}"
        in err
    )
    assert f"[a] run {a.run_id} failed (exit 1): retry 1 of 1" in err
    assert f"[a] retry: resuming run {a.run_id} from its checkpoint in" in err
    assert "left no checkpoint here; starting it over" in err


def test_a_run_mlflow_makes_itself_is_not_retried_and_gives_its_exit_status(capsys):
    starts = []

    def start(argv, env):
        starts.append(argv)
        return FakeMlflowRun(-15)  # killed by SIGTERM

    job = Job()
    Launcher(Plan("http://h:5000"), retries=2, start=start, poll_seconds=0.01).run([job])
    assert len(starts) == 1 and "--run-id" not in starts[0]
    assert (job.status, job.exit_code) == ("KILLED", 143)


def test_a_job_that_cannot_start_fails_alone():
    def create_run(params):
        if params["name"] == "bad":
            raise RuntimeError("no such experiment")
        return "run-" + params["name"]

    jobs = [Job(params={"name": "bad"}), Job(params={"name": "good"})]
    Launcher(
        Plan("http://h:5000"),
        create_run=create_run,
        start=lambda argv, env: FakeMlflowRun(0),
        poll_seconds=0.01,
        out=sys.stdout,
    ).run(jobs)
    assert [job.status for job in jobs] == ["NOT STARTED: no such experiment", "FINISHED"]


# ---------------------------------------------------------------------------
# make run WORKERS=N: N containers, one run, each with its TF_CONFIG
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_workers_must_be_a_positive_whole_number(value):
    from host.workers import workers_setting

    assert workers_setting(None) == 1 and workers_setting("3") == 3
    with pytest.raises(UserError, match="WORKERS must be a positive whole number"):
        workers_setting(value)


def test_worker_containers_get_their_tf_config():
    from engine.multiworker import cluster_from_env
    from host.workers import worker_docker_args

    def clusters(per_worker):
        # as bash reads the line `mlflow run` makes of the docker command
        words = [shlex.split(a["e"]) for a in per_worker]
        assert all(len(w) == 1 for w in words)
        return [cluster_from_env({"TF_CONFIG": w[0].removeprefix("TF_CONFIG=")}) for w in words]

    # the host network (a tracking server on this host's loopback): free ports on 127.0.0.1
    per_worker = worker_docker_args(
        Plan("http://x", {"network": "host"}), "abcdef0123456789", 2, "n"
    )
    found = clusters(per_worker)
    assert [c.index for c in found] == [0, 1] and found[0].workers == found[1].workers
    assert all(w.startswith("127.0.0.1:") for w in found[0].workers)
    assert "name" not in per_worker[0]
    # otherwise: one user-defined network, the workers found by container name
    per_worker = worker_docker_args(Plan("http://x"), "abcdef0123456789", 3, "mlflow-workers")
    assert [a["network"] for a in per_worker] == ["mlflow-workers"] * 3
    assert [a["name"] for a in per_worker] == [f"abcdef012345-worker-{i}" for i in range(3)]
    assert clusters(per_worker)[2].workers[2] == "abcdef012345-worker-2:2222"


@pytest.mark.slow
def test_make_run_with_workers_starts_each_container_into_one_run(
    fake_bin, tmp_path, mlflow_server
):
    from engine.multiworker import cluster_from_env

    calls = tmp_path / "calls.jsonl"
    lines = [
        f"#!{sys.executable}",
        "import json, sys",
        f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')",
    ]
    (fake_bin / "mlflow").write_text("\n".join(lines) + "\n")
    (fake_bin / "mlflow").chmod(0o755)
    fake_docker(fake_bin, {"runc": {}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW": str(fake_bin / "mlflow")}
    env.update(STORAGE_DIR=str(tmp_path), WORKERS="2")
    env.pop("GPUS", None)
    done = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "project_driver.py"), "run", "-P", "epochs=3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    argvs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert len(argvs) == 2 and "[worker 1] + mlflow run" in done.stderr
    assert len({argv[argv.index("--run-id") + 1] for argv in argvs}) == 1  # one run
    found = []
    for argv in argvs:
        e = next(a for a in argv if a.startswith("e="))
        (word,) = shlex.split(e.removeprefix("e="))
        found.append(cluster_from_env({"TF_CONFIG": word.removeprefix("TF_CONFIG=")}))
    assert sorted(c.index for c in found) == [0, 1] and found[0].workers == found[1].workers
    refused = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "project_driver.py"), "run"],
        capture_output=True,
        text=True,
        env={**env, "WORKERS": "2", "RETRIES": "1"},
        timeout=60,
    )
    assert refused.returncode == 2 and "set RETRIES=0" in refused.stderr


class WorkerMlflowRun(FakeMlflowRun):
    """A worker's `mlflow run`: when it ends, it marks the run with its own outcome, as
    mlflow.projects._maybe_set_run_terminated does (MLflow 3.17 means to leave an ended
    run alone, but compares the status string with RunStatus' numbers: it never does)."""

    def __init__(self, run_id: str, code: int, polls: int, ends_run: str = ""):
        super().__init__(code, polls)
        self.run_id, self.ends_run = run_id, ends_run

    def poll(self):
        code = super().poll()
        client = mlflow.MlflowClient()
        if code is not None and self.ends_run:  # the engine's own end_run in the container
            client.set_terminated(self.run_id, self.ends_run)
            self.ends_run = ""
        if code is not None:
            client.set_terminated(self.run_id, "FINISHED" if code == 0 else "FAILED")
        return code


@pytest.mark.parametrize(
    ("chief", "worker", "status"),
    [
        # the chief fails; worker 1, which waited for it to end the run, ends last and
        # its `mlflow run` marks the run FINISHED
        ((1, 1, "FAILED"), (0, 6, ""), "FAILED"),
        # worker 1 ends first and marks the run FINISHED; the chief is then OOM-killed
        ((137, 6, ""), (0, 1, ""), "FAILED"),
        # worker 1 fails after training; the chief finishes and registers the model
        ((0, 6, "FINISHED"), (1, 1, ""), "FINISHED"),
    ],
)
def test_only_the_chief_decides_how_a_workers_run_ends(tracking_store, chief, worker, status):
    from host.run import launch_workers

    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("workers")).info.run_id
    outcomes = {"0": chief, "1": worker}

    def start(argv, env):
        tf_config = next(a for a in argv if a.startswith("e="))
        index = json.loads(shlex.split(tf_config[2:])[0].split("=", 1)[1])["task"]["index"]
        code, polls, ends_run = outcomes[str(index)]
        return WorkerMlflowRun(run_id, code, polls, ends_run)

    plan = Plan(tracking_store, {"network": "host"})
    out = io.StringIO()
    job = launch_workers(plan, Job(run_id=run_id), 2, start=start, poll_seconds=0.01, out=out)
    assert job.label == "[worker 0] " and job.exit_code == chief[0]
    assert client.get_run(run_id).info.status == status
    if chief[0] == 1:
        assert f"run {run_id} was FINISHED; its chief (worker 0) says FAILED" in out.getvalue()
