"""`make reproduce`: a run trained again from its record, and the verdict.

The runs are real: train.py of a temporary git repository holding this checkout's code
(so the recorded commit exists), on demo images made here, into a local store. Each
reproduction trains again in a subprocess from a fresh checkout of that commit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

import lifecycle
from engine import reproduction, reproduction_verdict, run_record
from engine.config import UserError
from engine.sources import make_demo_data
from host.checkout import checkout_version
from tests.conftest import module_store, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--data-source", "demo", "--demo-samples", "24", "--image-size", "16",
    "--convolutions", "1", "--epochs", "2", "--batch-size", "8", "--cache", "false",
    "--export-savedmodel", "false", "--system-metrics", "false", "--experiment-name", "repro",
]  # fmt: skip
HOST = reproduction.Host(checkout_version)


def git(folder: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def copy_of_this_code(folder: Path) -> Path:
    """A git repository with one commit: this checkout's files as they are now."""
    listed = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file() and not (ROOT / name).is_symlink():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    git(folder, "init", "--quiet")
    git(folder, "add", "-A")
    git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "-m", "code")
    return folder


def train_in(repo: Path, data: Path, *flags: str) -> str:
    """train.py of repo in a subprocess; returns the run id."""
    argv = [sys.executable, "train.py", *TINY, "--data-dir", str(data), *flags]
    done = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout.split("run_id: ")[1].split()[0]


def reproduce(repo: Path, *argv: str) -> reproduction_verdict.Verdict:
    args = lifecycle.build_parser().parse_args(["reproduce", "--git-url", str(repo), *argv])
    return reproduction.reproduce(args, HOST)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A clean --deterministic run registered as `tiny` version 1, and a run made from
    a dirty tree (train.py edited, not committed), each on its own demo images."""
    root = tmp_path_factory.mktemp("reproduce")
    repo = copy_of_this_code(root / "repo")
    with module_store(f"sqlite:///{root / 'mlflow.db'}"):
        deterministic = ["--deterministic", "true", "--registered-model-name", "tiny"]
        clean = train_in(repo, root / "data-clean", *deterministic)
        with (repo / "train.py").open("a") as edited:
            edited.write("# an edit never committed\n")
        dirty = train_in(repo, root / "data-dirty", "--registered-model-name", "")
        git(repo, "checkout", "--", "train.py")
        yield {"repo": repo, "clean": clean, "dirty": dirty, "root": root}


@pytest.mark.slow
def test_a_deterministic_run_comes_back_exact(runs):
    verdict = reproduce(runs["repo"], "--model", "models:/tiny/1")
    assert verdict.verdict == "exact", verdict.line()
    client = mlflow.MlflowClient()
    new = client.get_run(verdict.reproduction_run)
    assert new.info.status == "FINISHED"
    assert new.data.tags["reproduces"] == runs["clean"]
    assert new.data.params["deterministic"] == "True"
    record = json.loads(
        Path(client.download_artifacts(new.info.run_id, "reproduction.json")).read_text()
    )
    assert record["verdict"] == "exact" and record["figures"] > 20
    assert record["context"]["data"]["checked"] and record["in_play"] == ""  # deterministic
    assert {"val_accuracy", "test_accuracy", "loss"} <= {d["metric"] for d in record["differences"]}
    artifacts = {a.path for a in client.list_artifacts(new.info.run_id)}
    assert "reproduction_curves.png" in artifacts
    tags = client.get_model_version("tiny", "1").tags
    assert tags["reproduced"] == "exact" and tags["reproduced_by"] == new.info.run_id
    reproduction_verdict.check_reproduced("tiny", "1")  # validate --require-reproduced passes


@pytest.mark.slow
def test_a_forced_learning_rate_is_reported_no_with_the_largest_difference(runs):
    verdict = reproduce(runs["repo"], "--run", runs["clean"], "--override", "learning_rate=0.3")
    assert verdict.verdict == "no", verdict.line()
    assert verdict.largest is not None and verdict.largest.difference > 0.01
    assert verdict.largest.describe() in verdict.line()
    tags = mlflow.MlflowClient().get_model_version("tiny", "1").tags
    assert tags["reproduced"] == "no" and verdict.largest.metric in tags["reproduced_max_diff"]
    with pytest.raises(UserError, match="make reproduce MODEL=models:/tiny/1"):
        reproduction_verdict.check_reproduced("tiny", "1")


@pytest.mark.slow
def test_fewer_cpus_still_come_back_exact_with_the_recorded_thread_count(runs):
    """The float sums split over as many threads as the source's: on this machine with
    one CPU left, the reproduction still runs the source's count of threads."""
    cpus = os.sched_getaffinity(0)
    recorded = mlflow.get_run(runs["clean"]).data.tags["determinism.intra_op_threads"]
    assert recorded == str(len(cpus))
    if len(cpus) < 2:
        pytest.skip("one CPU: no fewer to run on")
    os.sched_setaffinity(0, {min(cpus)})  # the training subprocess inherits it
    try:
        verdict = reproduce(runs["repo"], "--run", runs["clean"])
    finally:
        os.sched_setaffinity(0, cpus)
    assert verdict.verdict == "exact", verdict.line()


@pytest.mark.slow
def test_a_run_from_a_dirty_tree_is_refused(runs):
    with pytest.raises(UserError, match="uncommitted edits.*--allow-dirty"):
        reproduce(runs["repo"], "--run", runs["dirty"])


@pytest.mark.slow
def test_changed_data_stops_before_training_naming_the_file(runs):
    changed = sorted((runs["root"] / "data-dirty" / "parasitized").glob("*.png"))[0]
    changed.write_bytes(changed.read_bytes() + b"\0")
    before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(UserError, match=rf"1 changed: {changed}.*--allow-data-change"):
        reproduce(runs["repo"], "--run", runs["dirty"], "--allow-dirty")
    assert len(mlflow.search_runs(search_all_experiments=True)) == before  # nothing trained


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "models:/tiny@nope"], "no model models:/tiny@nope.*aliases"),
        (["--run", "0123456789abcdef"], "there is no run 0123456789abcdef"),
        (["--run", "{plain}"], "no code record"),
        (["--run", "{clean}", "--git-url", "{empty}"], "does not have.*--git-url URL"),
    ],
)
def test_bad_input_is_one_paragraph_and_exit_2(runs, tmp_path, capsys, argv, message):
    with mlflow.start_run(experiment_id="0") as plain:  # a run not made by train.py
        pass
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "--quiet")
    values = {"plain": plain.info.run_id, "clean": runs["clean"], "empty": str(empty)}
    argv = [item.format(**values) for item in argv]
    assert lifecycle.main(["reproduce", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err


def test_a_tracking_server_that_is_down_is_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert lifecycle.main(["reproduce", "--run", "abc"]) == 2
    assert "unreachable" in capsys.readouterr().err


def test_the_record_keeps_the_keys_the_digest_covered(tracking_store, tmp_path):
    """The record's keys are the ones the dataset digest was computed over, not a second
    stat: a file touched in between must show as changed, not pass or mismatch."""
    lineage = {
        "source": str(tmp_path),
        "digest": "d1",
        "table": {"path": [str(tmp_path / "a.png")], "label": ["cat"], "split": ["train"]},
        "keys": [f"{tmp_path / 'a.png'}|10|20"],
    }
    info = type("Info", (), {"lineage": lineage, "pipeline_params": {}})()
    mlflow.set_experiment("record-keys")
    with mlflow.start_run() as run:
        run_record.log_run_record(tiny_config(), info)
    folder = mlflow.MlflowClient().download_artifacts(
        run.info.run_id, run_record.LINEAGE_ARTIFACT, str(tmp_path / "got")
    )
    record = run_record.read_record(folder)
    assert record["rows"] == [[str(tmp_path / "a.png"), "cat", "train", lineage["keys"][0]]]


def test_the_digest_check_computes_the_training_digest(tmp_path):
    """engine.run_record recomputes the dataset digest without TensorFlow."""
    make_demo_data(tmp_path / "d", samples=4, image_size=8, seed=0)
    paths = sorted(str(p) for p in (tmp_path / "d").rglob("*.png"))
    rows = [[p, "x", "train", run_record.file_key(p)] for p in paths]
    digest = run_record.text_digest(f"{key}\tx\ttrain\n" for *_, key in rows)
    record = {"source": str(tmp_path / "d"), "rows": rows}
    assert run_record.data_changes(record, digest).same
    os.remove(paths[0])
    (tmp_path / "d" / "uninfected" / "new.png").write_bytes(Path(paths[1]).read_bytes())
    check = run_record.data_changes(record, digest)
    assert check.removed == [paths[0]] and check.added[0].endswith("new.png")
    # a file that was there before the run and left out of it (a fork's subset) is not new
    older = tmp_path / "d" / "uninfected" / "unused.png"
    older.write_bytes(Path(paths[1]).read_bytes())
    os.utime(older, (1_000_000, 1_000_000))
    check = run_record.data_changes(record, digest, since=2_000_000)
    assert [Path(p).name for p in check.added] == ["new.png"]


def test_the_verdict_exact_within_and_no():
    source = {"val_accuracy": {1: 0.5, 2: 0.75}, "val_loss": {1: 0.7, 2: 0.6}}
    assert (
        reproduction_verdict.decide(reproduction_verdict.compare(source, source), 0.01) == "exact"
    )
    near = {"val_accuracy": {1: 0.5, 2: 0.755}, "val_loss": {1: 0.7, 2: 0.6}}
    found = reproduction_verdict.compare(source, near)
    assert reproduction_verdict.decide(found, 0.01) == "within 0.01"
    assert found[0].metric == "val_accuracy" and found[0].step == 2
    missing = {"val_accuracy": {1: 0.5}}
    assert reproduction_verdict.decide(reproduction_verdict.compare(source, missing), 0.01) == "no"


def test_require_reproduced_names_make_reproduce():
    problem = reproduction_verdict.reproduced_problem({}, "m", "3")
    assert "never reproduced" in problem and "make reproduce MODEL=models:/m/3" in problem
    assert reproduction_verdict.reproduced_problem({"reproduced": "within 0.01"}, "m", "3") == ""
    assert "reproduced=no" in reproduction_verdict.reproduced_problem(
        {"reproduced": "no"}, "m", "3"
    )


def test_a_checkout_shares_the_projects_data_and_cache(tmp_path):
    """A fork's load_data that reads PROJECT_DIR/data finds it in the fresh checkout, and
    removing the checkout leaves the project's data alone."""
    project, checkout = tmp_path / "project", tmp_path / "checkout"
    (project / "data" / "cells").mkdir(parents=True)
    (project / "data" / "cells" / "a.png").write_bytes(b"x")
    (project / ".cache").mkdir()
    (checkout / ".cache").mkdir(parents=True)  # the checkout's own: kept
    notes = run_record.share_untracked(project, checkout)
    assert (checkout / "data" / "cells" / "a.png").read_bytes() == b"x"
    assert len(notes) == 1 and notes[0].startswith("data/")
    assert not (checkout / ".cache").is_symlink()
    shutil.rmtree(checkout)
    assert (project / "data" / "cells" / "a.png").exists()


def test_a_remote_git_url_is_not_asked_as_a_folder(tracking_store):
    """`git -C URL` only reads folders: a remote --git-url is checked when it is cloned,
    and a local one still now."""
    mlflow.set_experiment("remote-url")
    with mlflow.start_run() as active:
        mlflow.set_tags({"code.commit": "0" * 40, "code.dirty": "false"})
    source = reproduction.Source(mlflow.MlflowClient().get_run(active.info.run_id))
    url = "https://git.example.invalid/team/cells.git"
    assert reproduction.check_commit(source, url, allow_dirty=False) == "0" * 40
    with pytest.raises(UserError, match="does not have"):
        reproduction.check_commit(source, str(Path(__file__).parents[1]), allow_dirty=False)
