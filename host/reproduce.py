"""The host side of `make reproduce`: a fresh checkout of the recorded commit, and a run
in the image rebuilt from that commit, as `make run VERSION=<commit>` starts one.

engine/reproduction.py holds the steps and the verdict; lifecycle.py hands it
`checkout_version` and `run_in_image`. Nothing here imports TensorFlow or MLflow.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

from host.checkout import checkout_version
from host.facts import command_output
from host.run import run_main


def image_id(tag: str) -> str:
    """The local id of an image tag ("" when there is none)."""
    found = command_output(["docker", "image", "inspect", "--format", "{{.Id}}", tag]).strip()
    return found if found.startswith("sha256:") else ""


def run_argv(
    git_url: str, commit: str, params: Mapping[str, str], run_id: str, experiment_id: str
) -> list[str]:
    """`project_driver.py run`'s arguments: the commit from git, into the run made for it,
    with every parameter given (-P), so that none comes from the image's defaults."""
    argv = ["--git-url", git_url, "--version", commit]
    argv += ["--run-id", run_id, "--experiment-id", experiment_id]
    for name, value in params.items():
        argv += ["-P", f"{name}={value}"]
    return argv


def run_in_image(
    git_url: str,
    commit: str,
    params: Mapping[str, str],
    run_id: str,
    experiment_id: str,
    recorded_image: str = "",
) -> int:
    """Rebuild the image from the commit (host.run builds it for the checkout), train the
    run in it, and say whether the image came out with another id than the one the source
    run's tag names had here before.

    Args:
        git_url: the repository holding the commit.
        commit: the source run's code.commit.
        params: the parameters to train with (-P).
        run_id: the reproduction's run, created already (mlflow run --run-id).
        experiment_id: its experiment (the source run's).
        recorded_image: the source run's code.image tag (NAME:code-<hash>).

    Returns:
        The run's exit status.
    """
    before = image_id(recorded_image) if recorded_image else ""
    argv = run_argv(git_url, commit, params, run_id, experiment_id)
    status = run_main(argv, retries=0, base_image="")
    after = image_id(recorded_image) if recorded_image else ""
    if before and after and before != after:
        print(
            f"note: the image rebuilt from commit {commit[:12]} has id {after[:19]}, the one "
            f"the source run ran in had {before[:19]}: its base image or packages moved",
            file=sys.stderr,
        )
    elif recorded_image and not after:
        print(f"note: no image {recorded_image} here to compare ids with", file=sys.stderr)
    return status


def reproduce(args: argparse.Namespace) -> None:
    """`lifecycle.py reproduce`: engine.reproduction with this side's checkout and image run."""
    from engine import reproduction  # imports MLflow (seconds): only when the command runs

    reproduction.reproduce(args, reproduction.Host(checkout_version, run_in_image))
