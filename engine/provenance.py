"""Which code a run really ran: the code's identity, baked into the image, checked at run start.

A run started by `mlflow run` is tagged by MLflow with the commit of the folder it was
started from (`mlflow.source.git.commit`), but the container runs whatever code its image
holds. This module makes the two meet:

- `code_identity(project_dir)` says which code a folder holds: a content hash of exactly
  the files that `docker build` sends (the folder's `.dockerignore` decides, read the way
  Docker reads it, engine.dockerignore), and the git commit, with `dirty` when those
  files differ from it. The same function runs on the host (`make build` bakes its
  answer into the image, as labels and as `.code_identity.json`) and in the container,
  where there is no `.git`: there the commit comes from the baked file, and only while
  the code present still hashes the same.
- `check_and_tag(run_id, project_dir)` runs at the start of a run: it stops the run
  (`UserError`) when the code present is not the code the run is tagged with, or
  when the run's artifacts could not land, and otherwise tags the run with what it
  really runs: `code.commit`, `code.dirty`, `code.content_hash`, `code.image`.

The API is those two and `UserError`; `mismatch()` is the pure decision, and
`describe()`, `context_files()` and `bake()` serve the driver and the Dockerfile.

Command line (the Dockerfile calls `bake`):
    python -m engine.provenance identity [DIR]
    python -m engine.provenance bake --commit SHA --dirty false --content-hash HASH --image TAG

Imports neither TensorFlow nor train.py; MLflow only inside `check_and_tag`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from engine import dockerignore
from engine.common import local_path
from engine.config import UserError

# Written into the code folder of the image by `bake`; never part of the content hash.
BAKED_FILE = ".code_identity.json"
# The hash the driver built for, passed into the container (-A env=...), checked when set.
EXPECTED_HASH_ENV = "CODE_EXPECTED_CONTENT_HASH"
UNKNOWN = "unknown"


def context_files(project_dir: str | Path) -> list[str]:
    """The files `docker build` sends from this folder: relative "/" paths, sorted.

    .dockerignore decides (engine.dockerignore); `.code_identity.json` is never counted.
    """
    return dockerignore.sent_files(project_dir, leave_out={BAKED_FILE})


# ----------------------------------------------------------------------------
# Which content, which commit
# ----------------------------------------------------------------------------


def _blob_id(path: Path) -> str:
    """git's id of a file's content (`git hash-object`); a symlink hashes its target."""
    data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _git(project_dir: Path, *args: str) -> str | None:
    """stdout of a git command in the folder, or None without git or a repository.

    safe.directory=*: in a container the folder belongs to another uid than the one
    running, and git would refuse to read it.
    """
    try:
        done = subprocess.run(
            ["git", "-c", "safe.directory=*", "-C", str(project_dir), *args],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _git_commit(project_dir: Path, blobs: dict[str, str]) -> tuple[str, bool] | None:
    """(HEAD, dirty) where the folder is a git checkout, else None.

    dirty: the files the build sends differ from HEAD's (edited, added or deleted).
    """
    head = _git(project_dir, "rev-parse", "--verify", "HEAD")
    listing = _git(project_dir, "ls-tree", "-r", "-z", "HEAD")
    if not head or listing is None:
        return None
    patterns = dockerignore.read_patterns(project_dir)
    committed = {}
    for entry in filter(None, listing.split("\0")):
        meta, path = entry.split("\t", 1)
        if (
            meta.split()[1] == "blob"
            and dockerignore.is_sent(path, patterns)
            and path != BAKED_FILE
        ):
            committed[path] = meta.split()[2]
    return head.strip(), committed != blobs


def _read_baked(project_dir: str | Path) -> dict | None:
    """The identity that `make build` baked into the image, or None outside such an image."""
    path = Path(project_dir) / BAKED_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def code_identity(project_dir: str | Path) -> dict:
    """Which code this folder holds.

    Args:
        project_dir: the project folder (on the host, or /mlflow/projects/code in the image).

    Returns:
        {"commit": HEAD's sha or "unknown", "dirty": the sent files differ from that
        commit, "content_hash": sha256 over the sent files' paths and git blob ids,
        "files": the sent files}. Without git (in the image) the commit and dirty flag
        come from the baked `.code_identity.json`, and only when the content still hashes
        the same as when it was baked.
    """
    root = Path(project_dir)
    files = context_files(root)
    blobs = {path: _blob_id(root / path) for path in files}
    listing = "".join(f"{blobs[path]} {path}\n" for path in files)
    content_hash = hashlib.sha256(listing.encode()).hexdigest()
    commit, dirty = _git_commit(root, blobs) or (UNKNOWN, True)
    baked = _read_baked(root)
    if commit == UNKNOWN and baked and baked.get("content_hash") == content_hash:
        commit, dirty = baked.get("commit") or UNKNOWN, bool(baked.get("dirty", True))
    return {"commit": commit, "dirty": dirty, "content_hash": content_hash, "files": files}


def describe(identity: dict) -> str:
    """One phrase for messages: "commit 1a2b3c4d5e6f (+ uncommitted edits), code 0a1b2c3d4e5f"."""
    commit = identity.get("commit") or UNKNOWN
    text = f"commit {commit[:12]}" if commit != UNKNOWN else "an unknown commit"
    if commit != UNKNOWN and identity.get("dirty"):
        text += " (+ uncommitted edits)"
    return f"{text}, code {str(identity.get('content_hash', ''))[:12]}"


# ----------------------------------------------------------------------------
# At run start
# ----------------------------------------------------------------------------

_REBUILD = (
    "Start runs with `make run` or ./project_driver.bash, which build the image for the "
    "code first (seconds when only code changed), or run `make build` in a checkout of "
    "that commit; for a version in git: ./project_driver.bash --git-url URL --version SHA."
)


def mismatch(
    present: dict, run_commit: str | None, expected_hash: str | None, baked: dict | None
) -> str | None:
    """Why the code present is not the code the run claims to run, or None when it is.

    Args:
        present: code_identity() of the code that is about to run.
        run_commit: the run's `mlflow.source.git.commit` tag (None when MLflow set none).
        expected_hash: the content hash the driver built the image for (None: not given).
        baked: _read_baked() of the code folder (None outside an image from `make build`).
    """
    holds = f"this container holds {describe(present)}"
    if baked and baked.get("image"):
        holds += f" (image {baked['image']})"
    if expected_hash and expected_hash != present["content_hash"]:
        return (
            f"{holds}, but the driver built the image for code {expected_hash[:12]}: another "
            "build replaced the image in between. Start the run again."
        )
    if not run_commit:
        return None
    if present["commit"] == UNKNOWN:
        if baked is None:
            why = "this image has no code identity (it was not built by `make build`)"
        elif baked.get("content_hash") != present["content_hash"]:
            why = (
                f"the code here differs from the code baked into the image ({describe(baked)})"
                " and has no git history to say which commit it is"
            )
        else:
            why = "the image was built without its git commit (`docker build` by hand?)"
        return f"this run is tagged commit {run_commit[:12]}, but {why}. {_REBUILD}"
    if present["commit"] != run_commit:
        return (
            f"this run is tagged commit {run_commit[:12]} (mlflow.source.git.commit), but "
            f"{holds}: the image is stale. {_REBUILD}"
        )
    return None


def _artifacts_problem(artifact_uri: str, experiment_location: str) -> str | None:
    """Why a run's artifacts would not land, checked before training; None when they will.

    Only a container has a problem: MLflow mounts the run's local artifact folder into it,
    but not the experiment folder where MLflow 3 puts logged models (models/), and the
    container's user may not be allowed to write either.
    """
    run_dir = local_path(artifact_uri)
    if run_dir is None or not os.path.ismount(run_dir):
        return None  # a remote store, or not a container that MLflow mounted it into
    experiment_dir = local_path(experiment_location)
    if experiment_dir is None or not experiment_dir.is_absolute():
        experiment_dir = run_dir.parent.parent
    fix = (
        "This experiment keeps artifacts in a local folder (it was made without a server, "
        "e.g. by `make quickstart`). Start the run with `make run` or ./project_driver.bash, "
        "which mount that folder and run the container as its owner, or use an experiment "
        "made through the server (--experiment-name NAME)."
    )
    if not os.access(run_dir, os.W_OK):
        return f"uid {os.getuid()} cannot write this run's artifact folder {run_dir}. {fix}"
    # Mounted from the host, the folder is on the run folder's file system; else it is
    # the container's own, and whatever MLflow writes there is lost with the container.
    mounted = experiment_dir.is_dir() and experiment_dir.stat().st_dev == run_dir.stat().st_dev
    if not mounted or not os.access(experiment_dir, os.W_OK):
        return f"the experiment folder {experiment_dir} (logged models) is not mounted. {fix}"
    return None


def check_and_tag(run_id: str, project_dir: str | Path, client=None) -> dict:
    """Check that this run runs the code it is tagged with, then tag what it runs.

    Call it right after the run starts, before any training.

    Args:
        run_id: the active run.
        project_dir: the folder the code runs from.
        client: an MlflowClient (default: a new one for the current tracking URI).

    Returns:
        code_identity() of the code present (without "files").

    Raises:
        UserError: the code present is not the run's commit (a stale image), or the
            driver's expected code, or the run's artifacts cannot land. The caller lets it
            end the run, which MLflow then marks FAILED.
    """
    if client is None:
        # MLflow takes about a second to import; the host (make build, the driver) needs none
        from mlflow import MlflowClient

        client = MlflowClient()
    present = code_identity(project_dir)
    baked = _read_baked(project_dir)
    run = client.get_run(run_id)
    problem = mismatch(
        present,
        run.data.tags.get("mlflow.source.git.commit"),
        os.environ.get(EXPECTED_HASH_ENV),
        baked,
    )
    if problem is None:
        experiment = client.get_experiment(run.info.experiment_id)
        problem = _artifacts_problem(run.info.artifact_uri, experiment.artifact_location)
    if problem:
        raise UserError(problem)
    tags = {
        "code.commit": present["commit"],
        "code.dirty": str(present["dirty"]).lower(),
        "code.content_hash": present["content_hash"],
    }
    if baked and baked.get("content_hash") == present["content_hash"] and baked.get("image"):
        tags["code.image"] = baked["image"]
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    print(
        f"code: {describe(present)}"
        + (f", image {tags['code.image']}" if "code.image" in tags else "")
    )
    return {key: value for key, value in present.items() if key != "files"}


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def bake(project_dir: Path, commit: str, dirty: bool, content_hash: str, image: str) -> dict:
    """Write the image's identity file, after checking the host hashed the same files.

    Raises:
        UserError: the image received other files than the host hashed.
    """
    present = code_identity(project_dir)
    if content_hash and content_hash != present["content_hash"]:
        raise UserError(
            f"the build received other code ({present['content_hash'][:12]}) than the host "
            f"hashed ({content_hash[:12]}). Files in the image: {' '.join(present['files'])}. "
            "A builder without BuildKit skips a folder that `*` leaves out unless a "
            "`!folder/...` line names it: add one to .dockerignore."
        )
    baked = {
        "commit": commit or UNKNOWN,
        "dirty": dirty,
        "content_hash": present["content_hash"],
        "image": image,
        "files": present["files"],
    }
    (project_dir / BAKED_FILE).write_text(json.dumps(baked, indent=1) + "\n")
    return baked


def main(argv: list[str] | None = None) -> int:
    """`identity` prints a folder's code identity; `bake` writes it (the Dockerfile's step).

    Returns:
        0, or 2 for a user error (its message printed).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    identity = commands.add_parser("identity", help="print the identity of a folder's code")
    identity.add_argument("project_dir", nargs="?", default=".")
    baking = commands.add_parser("bake", help="write .code_identity.json (Dockerfile)")
    baking.add_argument("--project-dir", default=".")
    baking.add_argument("--commit", default=UNKNOWN)
    baking.add_argument("--dirty", default="true", choices=["true", "false"])
    baking.add_argument("--content-hash", default="")
    baking.add_argument("--image", default="")
    args = parser.parse_args(argv)
    try:
        if args.command == "identity":
            print(json.dumps(code_identity(args.project_dir), indent=1))
        else:
            dirty = args.dirty == "true"
            project_dir = Path(args.project_dir)
            baked = bake(project_dir, args.commit, dirty, args.content_hash, args.image)
            print(f"baked {describe(baked)} into {BAKED_FILE} ({len(baked['files'])} files)")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
