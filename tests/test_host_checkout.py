"""A version from git: the driver's --git-url and --version options, and a fresh
checkout of a version from a bare repository."""

from __future__ import annotations

import subprocess

import pytest

from engine import provenance
from engine.config import UserError
from host.checkout import checkout_version, split_version_args
from tests.test_provenance import DOCKERIGNORE, commit_all, make_project

# ---------------------------------------------------------------------------
# A version from git
# ---------------------------------------------------------------------------


def test_version_options_are_the_drivers_and_the_rest_goes_to_mlflow():
    url, version, rest = split_version_args(
        ["--git-url", "file:///r.git", "-P", "epochs=1", "--version=abc", "--run-name", "x"]
    )
    assert (url, version, rest) == ("file:///r.git", "abc", ["-P", "epochs=1", "--run-name", "x"])
    assert split_version_args(["-v", "main"])[1] == "main"
    with pytest.raises(UserError, match="--git-url needs a value"):
        split_version_args(["--git-url"])


def test_checkout_of_a_version_from_a_bare_repository(tmp_path):
    project = make_project(tmp_path / "p", DOCKERIGNORE, {"train.py": "print(1)\n"})
    first = commit_all(project, "first")
    (project / "train.py").write_text("print(2)\n")
    commit_all(project, "second")
    bare = tmp_path / "fork.git"
    subprocess.run(["git", "clone", "--quiet", "--bare", str(project), str(bare)], check=True)

    checkout = tmp_path / "checkout"
    assert checkout_version(bare.as_uri(), first, checkout) == first
    assert (checkout / "train.py").read_text() == "print(1)\n"
    assert provenance.code_identity(checkout)["commit"] == first
    with pytest.raises(UserError, match="checkout"):
        checkout_version(bare.as_uri(), "no-such-version", tmp_path / "other")
