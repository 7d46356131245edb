"""A version from git: `--git-url URL --version V` run a fresh checkout of it.

MLflow's own `mlflow run PATH -v V` checks the version out inside PATH itself, in your
working copy, so the driver clones into a temporary folder instead and removes it when
the run ends.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from engine.common import PROJECT_DIR
from engine.config import UserError
from host.plan import Plan


def split_version_args(args: Sequence[str]) -> tuple[str, str, list[str]]:
    """Take the driver's --git-url URL and --version V out of the mlflow run options.

    Returns:
        (git URL or "", version or "", the remaining options for mlflow run).
    """
    url, version, rest = "", "", []
    items = iter(args)
    for arg in items:
        name, equals, value = arg.partition("=")
        if name in ("--git-url", "--version", "-v"):
            if not equals:
                value = next(items, "")
            if not value:
                raise UserError(f"{name} needs a value")
            if name == "--git-url":
                url = value
            else:
                version = value
        else:
            rest.append(arg)
    return url, version, rest


def checkout_version(url: str, version: str, destination: Path) -> str:
    """Clone a git repository and check out a version (commit, branch or tag).

    Returns:
        The commit checked out.
    """
    steps = [
        ["git", "clone", "--quiet", "--no-checkout", url, str(destination)],
        ["git", "-C", str(destination), "checkout", "--quiet", "--detach", version or "HEAD"],
        ["git", "-C", str(destination), "rev-parse", "HEAD"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"{' '.join(step)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def checkout_if_asked(plan: Plan, url: str, version: str) -> Path:
    """The project folder a run starts: this one, or a fresh checkout of a git version
    (--git-url URL, --version V; a version alone means this folder's repository).

    The checkout goes into plan.project, and its temporary folder into plan.cleanup.
    """
    if not (url or version):
        return PROJECT_DIR
    plan.cleanup = tempfile.mkdtemp(prefix="mlflow-version-")
    project_dir = Path(plan.cleanup) / "project"
    source = url or str(PROJECT_DIR)
    commit = checkout_version(source, version, project_dir)
    plan.project = str(project_dir)
    plan.messages.append(f"version: {version or 'HEAD'} of {source} is commit {commit}")
    return project_dir


def remove_checkout(plan: Plan) -> None:
    """Remove the plan's checkout of a git version, if it made one."""
    if plan.cleanup:
        shutil.rmtree(plan.cleanup, ignore_errors=True)
