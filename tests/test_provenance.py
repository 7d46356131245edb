"""The code's identity (engine/provenance.py): which files the image build sends, their
content hash and commit, the identity baked into the image, and the check at run start
that stops a run whose image holds other code than its tags name."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import mlflow
import pytest

from engine import provenance
from engine.common import PROJECT_DIR
from engine.config import UserError

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
