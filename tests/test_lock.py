"""The locked environment: lock/ agrees with the requirements files, every pin is hashed,
the image's TensorFlow is the lock's, and a run's environment tags say what it ran with.

Nothing here reaches the network: `make env`'s failures are made with a local wheel
folder (a hash that does not match) and an index that cannot be reached.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine import environment
from engine.common import PROJECT_DIR

LOCK_DIR = PROJECT_DIR / "lock"


def pins(path: Path) -> dict[str, str]:
    """A requirements file's exact pins, following `-r` includes (normalized names)."""
    found: dict[str, str] = {}
    for line in environment.requirement_lines(path.read_text()):
        if line.startswith("-r "):
            found |= pins((path.parent / line.split(maxsplit=1)[1]).resolve())
    return found | environment.read_lock(path.read_text())


def lock(name: str) -> dict[str, str]:
    return environment.read_lock((LOCK_DIR / name).read_text())


# ---------------------------------------------------------------------------
# The lock and the files people edit
# ---------------------------------------------------------------------------


def test_every_lock_was_made_from_todays_requirements_files():
    assert environment.stale_message() == ""


def test_an_edited_requirements_file_is_caught_naming_it_and_make_lock(tmp_path):
    for name in [*environment.INPUTS, "lock/uv.in", *environment.LOCKS]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_DIR / name, tmp_path / name)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(requirements.read_text() + "\n# a comment changes nothing\n")
    assert environment.stale_message(tmp_path) == ""
    requirements.write_text(requirements.read_text() + "requests==2.32.3\n")
    message = environment.stale_message(tmp_path)
    assert message.startswith("requirements.txt changed since lock/runtime.txt")
    assert "`make lock`" in message and "commit" in message
    (tmp_path / "lock/server.txt").unlink()
    assert environment.stale_message(tmp_path).startswith(
        "lock/server.txt missing: run `make lock`"
    )


@pytest.mark.parametrize(
    ("inputs", "lock_name"),
    [
        ("requirements.txt", "runtime.txt"),
        ("tests/requirements.txt", "dev.txt"),
        ("tracking_server/requirements.txt", "server.txt"),
        ("lock/uv.in", "uv.txt"),
    ],
)
def test_every_pin_a_person_wrote_is_in_the_lock_at_that_version(inputs, lock_name):
    locked = lock(lock_name)
    disagree = {
        name: (version, locked.get(name))
        for name, version in pins(PROJECT_DIR / inputs).items()
        if locked.get(name) != version
    }
    assert not disagree, f"{inputs} and lock/{lock_name} disagree {disagree}: run `make lock`"


def test_the_server_lock_has_the_projects_mlflow():
    assert lock("server.txt")["mlflow"] == pins(PROJECT_DIR / "requirements.txt")["mlflow"]


@pytest.mark.parametrize("lock_name", ["runtime.txt", "server.txt"])
def test_runtime_and_server_locks_are_the_dev_locks_versions(lock_name):
    """.venv (dev), the training image (runtime) and the server image never differ."""
    dev = lock("dev.txt")
    assert {name: dev.get(name) for name in lock(lock_name)} == lock(lock_name)


@pytest.mark.parametrize("lock_name", ["runtime.txt", "dev.txt", "server.txt", "uv.txt"])
def test_every_locked_package_is_pinned_with_its_hashes(lock_name):
    lines = (LOCK_DIR / lock_name).read_text().splitlines()
    entries = re.split(r"\n(?=[A-Za-z0-9])", "\n".join(ln for ln in lines if ln[:1] != "#"))
    unhashed = [entry.split()[0] for entry in entries if "--hash=sha256:" not in entry]
    assert lock(lock_name) and not unhashed
    # Locked for the machines: Linux x86_64, Python 3.11 (lock/env.sh).
    assert "--python-version 3.11" in (LOCK_DIR / "env.sh").read_text()


def test_the_images_tensorflow_is_the_locks():
    """The Dockerfile's base tag and the lock name the same TensorFlow, so the base's
    TensorFlow is kept (pip skips a satisfied pin) instead of reinstalled over it."""
    dockerfile = (PROJECT_DIR / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=tensorflow/tensorflow:([0-9.]+)-gpu$", dockerfile, re.M)
    assert base, "Dockerfile: ARG BASE_IMAGE=tensorflow/tensorflow:<version>-gpu"
    assert lock("runtime.txt")["tensorflow"] == base.group(1)
    assert "--require-hashes --no-deps -r /tmp/runtime.txt" in dockerfile


# ---------------------------------------------------------------------------
# The environment a run names
# ---------------------------------------------------------------------------

LOCK_TEXT = """# header
numpy==2.4.6 \\
    --hash=sha256:aaaa \\
    --hash=sha256:bbbb
    # via keras
keras==3.15.1 \\
    --hash=sha256:cccc
"""


def test_the_lock_digest_changes_with_the_lock_and_not_with_its_notes():
    digest = environment.lock_digest(LOCK_TEXT)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert environment.lock_digest(LOCK_TEXT.replace("# via keras", "# via two")) == digest
    assert environment.lock_digest(LOCK_TEXT.replace("# header", "# other")) == digest
    assert environment.lock_digest(LOCK_TEXT.replace("2.4.6", "2.4.7")) != digest
    assert environment.lock_digest(LOCK_TEXT.replace("cccc", "dddd")) != digest
    project = environment.tags()["env.lock_digest"]
    assert project == environment.lock_digest((LOCK_DIR / "runtime.txt").read_text())


def test_an_environment_that_is_the_lock_matches_it():
    locked = environment.read_lock(LOCK_TEXT)
    assert locked == {"numpy": "2.4.6", "keras": "3.15.1"}
    found = environment.compare(locked, {**locked, "pip": "26.3", "uv": "0.13.9"})
    assert found.matches and found.extras == [] and found.mismatched == []


def test_a_package_installed_beside_the_lock_and_a_changed_version_are_reported(tmp_path):
    (tmp_path / "lock").mkdir()
    (tmp_path / "lock/runtime.txt").write_text(LOCK_TEXT)
    installed = {"numpy": "2.3.0", "requests-mock": "1.12.1", "pip": "26.3"}
    tags = environment.tags(tmp_path, installed)
    assert tags == {
        "env.lock_digest": environment.lock_digest(LOCK_TEXT),
        "env.matches_lock": "false",
        "env.mismatched_packages": "keras (missing; lock 3.15.1), numpy==2.3.0 (lock 2.4.6)",
        "env.extra_packages": "requests-mock==1.12.1",
    }
    many = {f"pkg{i}": "1.0" for i in range(8)}
    assert environment.tags(tmp_path, {"numpy": "2.4.6", "keras": "3.15.1", **many})[
        "env.extra_packages"
    ] == ("pkg0==1.0, pkg1==1.0, pkg2==1.0, pkg3==1.0, pkg4==1.0 (+3 more)")


def test_dev_lock_and_base_image_packages_are_not_extras(tmp_path, monkeypatch):
    (tmp_path / "lock").mkdir()
    (tmp_path / "lock/runtime.txt").write_text(LOCK_TEXT)
    (tmp_path / "lock/dev.txt").write_text(LOCK_TEXT + "pytest==9.2.0 \\\n    --hash=sha256:ee\n")
    (tmp_path / "base.txt").write_text("nvidia-cudnn-cu12==9.1.0\n")
    monkeypatch.setenv(environment.BASE_PACKAGES_VARIABLE, str(tmp_path / "base.txt"))
    installed = {"numpy": "2.4.6", "keras": "3.15.1", "pytest": "9.2.0"}
    installed |= {"nvidia-cudnn-cu12": "9.1.0", "PyYAML": "6.0.3"}
    tags = environment.tags(tmp_path, {environment.normalize(k): v for k, v in installed.items()})
    assert tags["env.extra_packages"] == "pyyaml==6.0.3"


def test_no_lock_in_the_folder_says_so(tmp_path):
    assert environment.tags(tmp_path, {}) == {
        "env.lock_digest": "missing",
        "env.matches_lock": "false",
    }


def test_this_interpreters_tags_name_the_projects_lock():
    tags = environment.tags()
    assert set(tags) == {
        "env.lock_digest",
        "env.matches_lock",
        "env.mismatched_packages",
        "env.extra_packages",
    }
    assert tags["env.matches_lock"] in {"true", "false"}


# ---------------------------------------------------------------------------
# make env's failures: one paragraph, and no half-made venv
# ---------------------------------------------------------------------------


def project_copy(tmp_path: Path, lock_lines: str = "") -> Path:
    """The files `lock/env.sh install` uses, with a dev lock of `lock_lines` when given."""
    project = tmp_path / "project"
    for name in [*environment.INPUTS, "lock/uv.in", *environment.LOCKS, "lock/env.sh"]:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_DIR / name, project / name)
    shutil.copytree(
        PROJECT_DIR / "engine", project / "engine", ignore=shutil.ignore_patterns("__pycache__")
    )
    if lock_lines:
        (project / "lock/dev.txt").write_text(lock_lines)
        subprocess.run(
            [sys.executable, "-m", "engine.environment", "stamp"], cwd=project, check=True
        )
    return project


def install(project: Path, installer: str, **env: str) -> subprocess.CompletedProcess:
    venv = project / ".venv"
    command = ["bash", "lock/env.sh", "install", str(venv), sys.executable, installer]
    # No pip.conf or index of this machine: only what the test names.
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    clean |= {"PIP_CONFIG_FILE": os.devnull, **env}
    return subprocess.run(command, cwd=project, capture_output=True, text=True, env=clean)


def test_make_env_refuses_a_lock_older_than_requirements_and_makes_nothing(tmp_path):
    project = project_copy(tmp_path)
    (project / "requirements.txt").write_text("requests==2.32.3\n")
    result = install(project, "uv")
    assert result.returncode == 1
    assert "requirements.txt changed since" in result.stderr and "`make lock`" in result.stderr
    assert not (project / ".venv").exists()


def tiny_wheel(folder: Path) -> Path:
    """A real, installable wheel of a package `tinypkg` 1.0."""
    folder.mkdir()
    wheel = folder / "tinypkg-1.0-py3-none-any.whl"
    info = "tinypkg-1.0.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tinypkg.py", "")
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tinypkg\nVersion: 1.0\n")
        archive.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def test_a_hash_the_registry_does_not_serve_stops_make_env_and_removes_the_venv(tmp_path):
    wheels = tiny_wheel(tmp_path / "wheels").parent
    project = project_copy(tmp_path, "tinypkg==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    result = install(project, "pip", PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()
    assert message[-2].startswith("make env: could not install lock/dev.txt: a file the registry")
    assert "`make lock`" in message[-2]
    assert message[-1] == f"make env: removed the unfinished {project / '.venv'}"
    assert not (project / ".venv").exists()


def test_no_registry_stops_make_env_and_a_venv_that_was_there_loses_only_its_stamp(tmp_path):
    project = project_copy(tmp_path)
    venv = project / ".venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (venv / ".installed").touch()
    # An index on a closed loopback port: the registry cannot be reached.
    result = install(project, "uv", PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0")
    assert result.returncode == 1
    assert "make env: could not install lock/uv.txt: the package registry could not be reached" in (
        result.stderr
    )
    assert (venv / "bin/python").exists() and not (venv / ".installed").exists()


def test_a_run_is_tagged_with_the_lock_it_ran_with(tracking_store, tmp_path):
    import mlflow

    from engine import environment
    from tests.conftest import tiny_config, train_and_log

    result = train_and_log(tiny_config(data_dir=str(tmp_path / "demo")))
    tags = mlflow.MlflowClient().get_run(result.run_id).data.tags
    expected = environment.tags()
    assert tags["env.lock_digest"] == expected["env.lock_digest"]
    assert tags["env.matches_lock"] in ("true", "false")
    assert tags["env.matches_lock"] == expected["env.matches_lock"]
