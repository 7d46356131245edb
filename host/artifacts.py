"""Artifacts in a local folder, and creating a run before `mlflow run` starts it.

An experiment made without a server (e.g. Default after `make quickstart`) keeps its
artifacts in a local folder. MLflow mounts only the run's own artifact folder, which
Docker creates as root when it is missing, and not the experiment folder where MLflow 3
writes logged models (models/). So the driver mounts the experiment folder at the same
path, runs the container as the folder's owner (root included), and creates the run
first, its folder owned by that user, then hands `--run-id` to `mlflow run`. A run that
may be retried is created first too, so that the launcher knows its id.

MLflow is imported inside the functions that need it: importing it costs seconds, which
`--help`, `check` and a run into a server's experiment need not pay.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from engine.common import PROJECT_DIR, local_path
from engine.config import UserError
from host.facts import SERVER_TIMEOUT
from host.plan import Plan, option


def local_folder(artifact_location: str, base: Path = PROJECT_DIR) -> Path | None:
    """The host folder of a local artifact location; None for a remote store."""
    return local_path(artifact_location, base)


def artifact_docker_args(
    experiment: str, folder: Path, owner: tuple[int, int]
) -> tuple[dict[str, str], str]:
    """Mount an experiment's local artifact folder and run the container as its owner."""
    uid, gid = owner
    return {"mount": f"type=bind,source={folder},target={folder}", "user": f"{uid}:{gid}"}, (
        f"artifacts: experiment '{experiment}' keeps artifacts in the local folder {folder} "
        f"(made without a server): mounted at the same path, the container runs as its owner "
        f"{uid}:{gid}, and the run is created first so that its folder is theirs"
    )


def parse_run_options(project_uri: str, args: Sequence[str]) -> dict:
    """The user's `mlflow run` options, parsed by mlflow's own command line (its env vars,
    such as MLFLOW_EXPERIMENT_NAME, included)."""
    import click  # comes with mlflow; imported with it, when a run is created first
    from mlflow.cli import run as run_command  # seconds to import: only when needed

    try:
        options = run_command.make_context("mlflow run", [project_uri, *args]).params
    except click.ClickException as error:
        raise UserError(f"mlflow run {' '.join(args)}: {error.format_message()}") from None
    options["parameters"] = dict(item.split("=", 1) for item in options["param_list"])
    return options


def _experiment_over_rest(uri: str, name: str, experiment_id: str) -> dict | None:
    """MLflow's experiment API in one plain request (no MLflow import: seconds saved on
    every run); None when no such experiment exists."""
    if name:
        endpoint, query = "get-by-name", {"experiment_name": name}
    else:
        endpoint, query = "get", {"experiment_id": experiment_id}
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/{endpoint}?{urlencode(query)}"
    try:
        with urllib.request.urlopen(url, timeout=SERVER_TIMEOUT) as response:
            return json.load(response)["experiment"]
    except urllib.error.HTTPError as error:
        if error.code == 404 and b"RESOURCE_DOES_NOT_EXIST" in error.read():
            return None
        raise


def find_experiment(uri: str, args: Sequence[str], environ: Mapping[str, str]) -> dict | None:
    """The experiment `mlflow run` with these options will log to, as MLflow picks it
    (--experiment-id, --experiment-name, their environment variables, else Default).

    Returns:
        {"experiment_id", "name", "artifact_location"}, or None when it does not exist
        yet (`mlflow run` then makes it through the server).
    """
    name = option(args, "--experiment-name") or environ.get("MLFLOW_EXPERIMENT_NAME", "")
    experiment_id = option(args, "--experiment-id") or environ.get("MLFLOW_EXPERIMENT_ID", "")
    if experiment_id:
        name = ""
    plain = urlsplit(uri).scheme in ("http", "https") and not any(
        environ.get(f"MLFLOW_TRACKING_{key}") for key in ("USERNAME", "TOKEN", "INSECURE_TLS")
    )
    if plain:
        try:
            return _experiment_over_rest(uri, name, experiment_id or "0")
        except (OSError, ValueError, KeyError):
            pass  # MLflow's client says why, below
    from mlflow import MlflowClient  # seconds to import: only for a store REST cannot ask

    client = MlflowClient(uri)
    found = (
        client.get_experiment_by_name(name) if name else client.get_experiment(experiment_id or "0")
    )
    if found is None:
        return None
    return {
        "experiment_id": found.experiment_id,
        "name": found.name,
        "artifact_location": found.artifact_location,
    }


def local_artifacts(plan: Plan, project_dir: Path, args: Sequence[str]) -> dict | None:
    """When the run's experiment keeps artifacts in a local folder, plan for them to land.

    Adds the folder's mount and owner (artifact_docker_args) to the plan.

    Returns:
        None for an experiment whose artifacts go through the server (or one that does not
        exist yet: `mlflow run` makes it there); else the parsed `mlflow run` options with
        "experiment_id" and "tracking_uri": create_run_first() then makes each run.
    """
    if option(args, "--run-id"):
        return None
    experiment = find_experiment(plan.tracking_uri, args, os.environ)
    folder = local_folder(experiment["artifact_location"]) if experiment else None
    if folder is None:
        return None
    options = parse_run_options(str(project_dir), args)
    folder.mkdir(parents=True, exist_ok=True)
    owner = (folder.stat().st_uid, folder.stat().st_gid)
    plan.decide(*artifact_docker_args(experiment["name"], folder, owner))
    return {
        **options,
        "experiment_id": experiment["experiment_id"],
        "tracking_uri": plan.tracking_uri,
    }


def first_run_options(plan: Plan, project_dir: Path, args: Sequence[str]) -> dict:
    """create_run_first()'s options for an experiment of any kind (made if missing), so
    that a run has its id before it starts (to be retried, or listed in a sweep)."""
    experiment = find_experiment(plan.tracking_uri, args, os.environ)
    if experiment is None:  # `mlflow run` would make it; make it now
        from mlflow import MlflowClient  # seconds to import: only to make an experiment

        name = option(args, "--experiment-name") or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        experiment = {"experiment_id": MlflowClient(plan.tracking_uri).create_experiment(name)}
    options = parse_run_options(str(project_dir), args)
    experiment_id = experiment["experiment_id"]
    return {**options, "experiment_id": experiment_id, "tracking_uri": plan.tracking_uri}


def create_run_first(
    project_dir: Path, options: Mapping, parameters: Mapping[str, str], user: str
) -> str:
    """Create the run as `mlflow run` would (same tags and parameters, by MLflow's own
    functions) and its local artifact folder, owned by the container's user; `mlflow run
    --run-id` then uses it. Docker would otherwise create the folder as root.

    Args:
        project_dir: the project the run starts.
        options: first_run_options() or local_artifacts()'s answer.
        parameters: the run's -P values.
        user: the container's "uid:gid".

    Returns:
        The run id.
    """
    # Seconds to import: only when a run is created first.
    import mlflow
    from mlflow.projects.utils import fetch_and_validate_project, get_or_create_run

    mlflow.set_tracking_uri(options["tracking_uri"])
    entry_point, parameters = options["entry_point"], dict(parameters)
    work_dir = fetch_and_validate_project(str(project_dir), None, entry_point, parameters)
    experiment_id = options["experiment_id"]
    run = get_or_create_run(
        None, str(project_dir), experiment_id, work_dir, None, entry_point, parameters
    )
    run_folder = local_folder(run.info.artifact_uri)
    if run_folder is None:  # artifacts go through the server: no folder to make here
        return run.info.run_id
    run_folder.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0 and re.fullmatch(r"\d+:\d+", user):
        uid, gid = (int(part) for part in user.split(":"))
        for path in (run_folder.parent, run_folder):
            os.chown(path, uid, gid)
    return run.info.run_id
