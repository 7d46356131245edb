"""make tune: real Optuna studies (journal file and PostgreSQL) training real trials,
recorded in a real MLflow store; nothing is mocked."""

from __future__ import annotations

import ast
import graphlib
import itertools
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from engine import tune
from host.facts import GpuInfo
from host.plan import Plan
from host.tune import tune_storage_problem, tune_worker_command
from tests.servers import PostgresServer, find_postgres_bindir, free_port

# Small and fast: 32x32 synthetic images, a one-layer CNN unless searched.
TRAIN_FLAGS = shlex.split(
    "--data-source demo --demo-samples 64 --image-size 32 --batch-size 16 "
    "--randomize-images false --dense-units 8 --export-savedmodel false "
    "--system-metrics false --experiment-name tune-tests"
)


@pytest.fixture
def demo_flags(tmp_path):
    """The train flags, with demo data made once in tmp_path (not in the project)."""
    return [*TRAIN_FLAGS, "--data-dir", str(tmp_path / "demo")]


def runs_of(experiment_name: str):
    experiment = mlflow.get_experiment_by_name(experiment_name)
    return mlflow.MlflowClient().search_runs([experiment.experiment_id], max_results=1000)


def parent_and_children(experiment_name: str):
    runs = runs_of(experiment_name)
    parents = [r for r in runs if r.data.tags.get("tune.role") == "parent"]
    assert len(parents) == 1, [r.data.tags for r in runs]
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def epochs_logged(run) -> int:
    return len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss"))


def load_study(storage: str, name: str):
    return optuna.load_study(study_name=name, storage=tune.open_storage(storage))


# ---------------------------------------------------------------- the package's shape

TUNE_DIR = Path(tune.__file__).parent


def test_the_tune_modules_import_one_way():
    """No module of engine/tune imports one that imports it back (graphlib finds cycles)."""
    graph = {}
    for path in TUNE_DIR.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[path.stem] = {
            name.rpartition(".")[2]
            for name in imported
            if name.startswith("engine.tune.")
            and (TUNE_DIR / f"{name.removeprefix('engine.tune.')}.py").exists()
        }
    assert graph["settings"] == set() and "worker" in graph["cli"]
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a circle


def test_importing_engine_tune_loads_no_mlflow_or_tensorflow():
    """The host imports engine.tune for SETTINGS_ENV and main; --help answers without TF."""
    script = (
        "import sys; from engine import tune; tune.main, tune.SETTINGS_ENV, tune.Launcher; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'tensorflow', "
        "'keras'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=TUNE_DIR.parents[1], capture_output=True, text=True
    )
    assert done.stdout.strip() == "[]", done.stderr[-2000:]


# ---------------------------------------------------------------- bad input, no training


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--param", "learnin_rate=1e-4:1e-2"], ["'learnin_rate' is not a knob", "learning_rate"]),
        (["--param", "dropout=0.5:0.1"], ["dropout", "inverted"]),
        (["--param", "dropout=0.2:0.2"], ["dropout", "empty"]),
        (["--param", "dropout=0:1"], ["dropout", "refused by the Config", "[0, 1)"]),
        (["--param", "data_source=1:3"], ["data_source is a str", "list of choices"]),
        (["--param", "learning_rate=0:0.1:log"], ["log range needs low > 0"]),
        (["--metric", "val_f1"], ["--metric 'val_f1' is unknown", "val_accuracy"]),
    ],
)
def test_bad_input_stops_before_any_trial(
    tracking_store, tmp_path, demo_flags, capsys, flags, says
):
    storage = str(tmp_path / "study.journal")
    code = tune.main(["train", "--storage", storage, "--space", "", *flags, *demo_flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    for text in says:
        assert text in err
    assert mlflow.get_experiment_by_name("tune-tests") is None  # no run was made
    assert not (tmp_path / "demo").exists()  # no data was loaded


def test_an_unreachable_study_database_stops_before_any_trial(tracking_store, demo_flags, capsys):
    url = f"postgresql://tuner:secret@127.0.0.1:{free_port()}/studies"
    code = tune.main(["train", "--storage", url, "--param", "dropout=0:0.5", *demo_flags])
    err = capsys.readouterr().err
    assert code == 2
    assert "unreachable" in err and "Traceback" not in err
    assert "secret" not in err  # the password is not printed
    assert mlflow.get_experiment_by_name("tune-tests") is None


def test_a_train_flag_pins_a_parameter_and_param_overrides_the_file(tmp_path):
    space_file = tmp_path / "tune.yaml"
    space_file.write_text(
        "learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}\n"
        "convolutions: [1, 2, 3]\ndropout: {low: 0.0, high: 0.5}\n"
    )
    argv = ["train", "--space", str(space_file), "--storage", str(tmp_path / "j")]
    argv += shlex.split("--param dropout=0.1:0.2 --workers 3 --trials 7")
    settings, workers, trials = tune.prepare([*argv, *TRAIN_FLAGS, "--convolutions", "2"])
    space = {p["name"]: p for p in settings.space}
    assert set(space) == {"learning_rate", "dropout"}  # convolutions pinned by its flag
    assert (space["dropout"]["low"], space["dropout"]["high"]) == (0.1, 0.2)
    assert space["learning_rate"]["log"] is True
    assert settings.base["convolutions"] == 2
    assert (settings.metric, settings.direction) == ("val_loss", "minimize")
    assert (workers, trials) == (3, 7)


# ---------------------------------------------------------------- whole studies


@pytest.mark.slow
def test_workers_pull_trials_into_one_parent_run_and_the_best_is_registered(
    tracking_store, tmp_path, demo_flags
):
    """The done-when command, smaller: 4 trials on 2 workers."""
    storage = str(tmp_path / "study.journal")
    space_file = tmp_path / "tune.yaml"
    space_file.write_text(
        "learning_rate: {low: 1.0e-3, high: 1.0e-2, log: true}\nconvolutions: [1, 2]\n"
    )
    argv = ["train", "--storage", storage, "--space", str(space_file), *demo_flags]
    argv += shlex.split("--trials 4 --workers 2 --study-name done-when --epochs 2")
    code = tune.main([*argv, "--registered-model-name", "tuned"])
    assert code == 0
    parent, children = parent_and_children("tune-tests")
    assert parent.info.status == "FINISHED"
    assert len(children) == 4
    study = load_study(storage, "done-when")
    trials = {t.number: t for t in study.trials}
    assert len(trials) == 4

    for child in children:  # each child is its trial, with its parameters and epochs
        trial = trials[int(child.data.tags["tune.trial"])]
        assert child.info.status == "FINISHED"
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        assert float(child.data.params["learning_rate"]) == pytest.approx(
            trial.params["learning_rate"]
        )
        assert int(child.data.params["convolutions"]) == trial.params["convolutions"]
        assert child.data.params["registered_model_name"] == ""
        pruned = child.data.tags["tune.pruned"] == "true"
        assert trial.state == (TrialState.PRUNED if pruned else TrialState.COMPLETE)
        expected_epochs = int(child.data.tags["tune.pruned_epoch"]) if pruned else 2
        assert epochs_logged(child) == expected_epochs

    spans = [(c.info.start_time, c.info.end_time) for c in children]
    assert any(a[0] < b[1] and b[0] < a[1] for a, b in itertools.combinations(spans, 2)), (
        "no two trials overlapped in time"
    )

    complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value)
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    for name, value in best.params.items():
        assert parent.data.params[f"best.{name}"] == str(value)
    assert parent.data.metrics["trials_finished"] == len(complete)
    assert parent.data.metrics["trials_pruned"] == 4 - len(complete)
    plots = {f.path for f in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots

    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name='tuned'")
    assert len(versions) == 1  # only the best trial's model
    assert versions[0].run_id == best.user_attrs["mlflow_run_id"]
    assert client.get_model_version_by_alias("tuned", "candidate").version == versions[0].version


@pytest.mark.slow
def test_a_bad_trial_is_pruned_and_a_study_resumes_after_a_dead_worker(
    tracking_store, tmp_path, demo_flags
):
    storage = str(tmp_path / "study.journal")
    flags = ["train", "--storage", storage, "--space", "", *demo_flags]
    flags += shlex.split("--workers 1 --study-name resumed --param learning_rate=0.0005:10:log")
    flags += ["--convolutions", "1", "--epochs", "3", "--registered-model-name", ""]
    # Two sane trials, then a learning rate of 10, whose loss explodes: the median
    # pruner stops it at its second epoch.
    study = optuna.create_study(study_name="resumed", storage=tune.open_storage(storage))
    for learning_rate in (1e-3, 2e-3, 10.0):
        study.enqueue_trial({"learning_rate": learning_rate})
    assert tune.main([*flags, "--trials", "3"]) == 0
    parent, children = parent_and_children("tune-tests")
    by_trial = {int(c.data.tags["tune.trial"]): c for c in children}
    assert sorted(by_trial) == [0, 1, 2]
    for number in (0, 1):
        assert by_trial[number].data.tags["tune.pruned"] == "false"
        assert epochs_logged(by_trial[number]) == 3
    bad = by_trial[2]
    assert bad.info.status == "FINISHED"
    assert bad.data.tags["tune.pruned"] == "true"
    assert bad.data.tags["tune.pruned_epoch"] == "2"
    assert epochs_logged(bad) == 2
    assert load_study(storage, "resumed").trials[2].state == TrialState.PRUNED

    # A worker died mid-trial: its trial and run were left RUNNING, its pid is gone.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    study = load_study(storage, "resumed")
    orphan = study.ask({"learning_rate": FloatDistribution(0.0005, 10, log=True)})
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{dead.stdout.strip()}")
    client = mlflow.MlflowClient()
    orphan_run = client.create_run(
        parent.info.experiment_id, tags={"mlflow.parentRunId": parent.info.run_id}
    )
    orphan.set_user_attr("mlflow_run_id", orphan_run.info.run_id)

    assert tune.main([*flags, "--trials", "1"]) == 0
    parent_again, children = parent_and_children("tune-tests")
    assert parent_again.info.run_id == parent.info.run_id  # the same parent run
    assert client.get_run(orphan_run.info.run_id).info.status == "FAILED"
    trials = load_study(storage, "resumed").trials
    assert len(trials) == 5
    assert trials[3].state == TrialState.FAIL
    retry = trials[4]
    assert retry.user_attrs["retry_of"] == 3
    assert retry.params == trials[3].params
    assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert {c.info.run_id for c in children} >= {t.user_attrs["mlflow_run_id"] for t in trials}


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.skipif(find_postgres_bindir() is None, reason="PostgreSQL binaries not installed")
def test_a_study_on_real_postgresql(tracking_store, tmp_path, demo_flags):
    server = PostgresServer(user="tuner", database="studies").start()
    try:
        argv = ["train", "--storage", server.url, "--space", "", *demo_flags]
        argv += shlex.split("--trials 2 --workers 2 --study-name on-postgres --convolutions 1")
        argv += shlex.split("--param learning_rate=1e-3:1e-2:log --epochs 1")
        code = tune.main([*argv, "--registered-model-name", ""])
        assert code == 0
        study = load_study(server.url, "on-postgres")
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
        parent, children = parent_and_children("tune-tests")
        assert len(children) == 2
        assert parent.data.params["tune.storage"] == server.url.replace(server.password, "***")
        assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    finally:
        server.cleanup()


def test_a_worker_under_a_kubernetes_jobs_run_files_it_under_the_parent(
    tracking_store, monkeypatch
):
    """make kube-tune: MLflow's Kubernetes backend gives every pod its Job's run
    (MLFLOW_RUN_ID); a worker files that run under the study's parent run and trains
    its trials as runs of their own, not into it."""
    from engine.tune.worker import adopt_job_run

    client = mlflow.MlflowClient()
    experiment = client.create_experiment("kube-tune")
    parent, job = (client.create_run(experiment).info.run_id for _ in range(2))
    monkeypatch.setenv("MLFLOW_RUN_ID", job)
    adopt_job_run(parent)
    assert "MLFLOW_RUN_ID" not in os.environ
    tags = client.get_run(job).data.tags
    assert (tags["mlflow.parentRunId"], tags["tune.role"]) == (parent, "workers")


# ---------------------------------------------------------------- Docker workers (no Docker)


def test_each_docker_worker_gets_its_own_gpu_the_plan_and_the_settings():
    plan = Plan(tracking_uri="http://127.0.0.1:5000")
    plan.decide({"network": "host"}, "tracking")
    plan.decide({"user": "1000:1000"}, "user")
    plan.decide({"volume": "/storage:/storage"}, "storage")
    four = GpuInfo(runtime=True, count=4)
    commands = [
        tune_worker_command(w, '{"a": 1}', plan, four, "auto", "img:code-1") for w in range(5)
    ]
    for worker, command in enumerate(commands):
        assert command[:3] == ["docker", "run", "--rm"]
        assert f"--gpus=device={worker % 4}" in command
        assert {"--network=host", "--user=1000:1000", "--volume=/storage:/storage"} <= set(command)
        assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in command
        assert f'{tune.SETTINGS_ENV}={{"a": 1}}' in command
        image = command.index("img:code-1")
        assert command[image + 1 :] == ["python", "-m", "engine.tune", "worker", "-", str(worker)]


@pytest.mark.parametrize(
    "storage, tracking, says",
    [
        ("/storage/tune/s.journal", "http://127.0.0.1:5000", ""),
        ("postgresql://u:p@db:5432/optuna", "http://127.0.0.1:5000", ""),
        ("/work/.tune/s.journal", "http://127.0.0.1:5000", "not under STORAGE_DIR"),
        ("sqlite:////storage/s.db", "http://127.0.0.1:5000", "not shared"),
        ("/storage/tune/s.journal", "sqlite:///mlflow.db", "cannot reach"),
    ],
)
def test_docker_workers_need_a_shared_storage_and_a_tracking_server(storage, tracking, says):
    problem = tune_storage_problem(storage, "/storage", tracking)
    assert (says in problem) if says else problem == ""


@pytest.mark.slow
def test_sigterm_stops_a_study_its_trials_fail_and_it_continues(
    tracking_store, tmp_path, demo_flags
):
    """A real `python -m engine.tune` stopped mid-trial, as a scheduler or Ctrl-C does."""
    storage = str(tmp_path / "study.journal")
    flags = ["--storage", storage, "--space", "", *demo_flags, "--registered-model-name", ""]
    flags += shlex.split("--workers 1 --study-name stopped --param learning_rate=1e-3:1e-2:log")
    flags += ["--convolutions", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.tune", "train", "--trials", "2", *flags, "--epochs", "50"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    for line in process.stdout:  # stop it once a trial trains
        output.append(line)
        if "Epoch 2/50" in line:
            process.send_signal(signal.SIGTERM)
            break
    output += process.stdout.readlines()
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, "".join(output)[-3000:]
    assert "Continue the study with --study-name stopped" in "".join(output)
    assert "Traceback" not in "".join(output)
    parent, children = parent_and_children("tune-tests")
    assert parent.info.status == "KILLED"
    assert [c.info.status for c in children] == ["FAILED"]
    assert [t.state for t in load_study(storage, "stopped").trials] == [TrialState.FAIL]

    assert tune.main(["train", "--trials", "1", *flags, "--epochs", "1"]) == 0
    parent_again, children = parent_and_children("tune-tests")
    assert parent_again.info.run_id == parent.info.run_id
    assert parent_again.info.status == "FINISHED"
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
