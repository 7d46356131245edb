"""Run this project's training in its Docker image through MLflow Projects.

Usage:
    ./project_driver.bash -P epochs=3                 # one run (make run ARGS="-P epochs=3")
    ./project_driver.bash --git-url URL --version SHA -P epochs=3   # a version from git
    python project_driver.py plan -P epochs=3         # what project_driver.bash evaluates
    python project_driver.py check                    # does the tracking server answer?
    python project_driver.py build                    # the image for the code here (make build)
    python project_driver.py sweep -P epochs=1,2 -P learning_rate=0.001,0.01
    python project_driver.py sweep --grid sweep.yaml --parallel 2 --experiment-name lr-sweep
    RETRIES=2 ./project_driver.bash -P epochs=30      # a failed run is resumed, twice at most
    python project_driver.py tune --trials 20 --workers 4 --epochs 8   # make tune-docker

Before anything starts, the driver checks the tracking server, builds the image for the
code it runs (seconds when only code changed; tagged NAME:latest and NAME:code-<hash>,
with the code's commit and content hash baked in, see engine/provenance.py), and decides,
saying in one line each:
  GPU       --gpus all when Docker has an NVIDIA runtime, else the CPU (GPUS=none|all|device=N
            overrides); a sweep on several GPUs gives each run its own (--gpus device=N);
  tracking  the MLflow server must answer within seconds; one on this host's loopback
            (http://localhost:5000) is reached with --network host, or, with
            DOCKER_NETWORK=bridge, through the Docker bridge gateway address;
  user      the container runs as the caller's uid:gid (the image's `trainer` user when the
            caller is root), so files it writes on mounted folders are not root-owned;
  storage   STORAGE_DIR (default /storage) is mounted at the same path when it exists;
  artifacts an experiment that keeps artifacts in a local folder (one made by the local
            store, e.g. Default after `make quickstart`) has that folder mounted at the same
            path, the container runs as the folder's owner, and the run is created first so
            that its artifact folder exists, owned by that user, before Docker mounts it.
Nothing else from the host is mounted: no home folder, no ~/.pgpass, no keys.

The pure decisions (docker args, the tracking URI, the sweep grid) are functions that
tests call without Docker; main() only gathers facts from the host and prints.
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit, urlunsplit

import yaml

from engine import provenance
from engine.common import CHECKPOINT_STATE, PROJECT_DIR, check_tracking_uri, local_path
from engine.config import UserError

# The uid of the `trainer` user that Dockerfile creates (its USER_UID build arg).
IMAGE_UID = 1000
DEFAULT_STORAGE_DIR = "/storage"
# Docker's default bridge gateway, used when `docker network inspect` does not say.
DEFAULT_BRIDGE_GATEWAY = "172.17.0.1"
# Seconds to wait for the tracking server before giving up (fail fast, not after 255 s).
SERVER_TIMEOUT = 5.0


def read_image_tag(mlproject: Path = PROJECT_DIR / "MLproject") -> str:
    """The training image tag, from MLproject's docker_env (the one place it is written).

    Args:
        mlproject: path of the MLproject file.

    Returns:
        The image tag, e.g. "py-tf2-gpu-dock-mlflow:latest".
    """
    spec = yaml.safe_load(mlproject.read_text())
    try:
        return str(spec["docker_env"]["image"])
    except (KeyError, TypeError):
        raise UserError(f"{mlproject} has no docker_env: image: ... entry") from None


@dataclass
class GpuInfo:
    """What the host offers for GPUs in containers."""

    runtime: bool  # Docker can start containers with --gpus (NVIDIA runtime or toolkit)
    count: int  # GPUs that nvidia-smi lists on the host (0 when it is missing)


def _output(command: Sequence[str], timeout: float = 20) -> str:
    """stdout of a command, or "" when it is missing or fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def detect_gpus() -> GpuInfo:
    """Ask Docker for its runtimes and nvidia-smi for the GPUs."""
    runtimes = _output(["docker", "info", "--format", "{{json .Runtimes}}"])
    toolkit = any(
        shutil.which(name)
        for name in ("nvidia-container-runtime-hook", "nvidia-container-toolkit", "nvidia-ctk")
    )
    listing = _output(["nvidia-smi", "-L"])
    count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
    return GpuInfo(runtime="nvidia" in runtimes or (toolkit and count > 0), count=count)


def bridge_gateway() -> str:
    """The host's address on Docker's default bridge (where containers find the host)."""
    gateway_format = "{{range .IPAM.Config}}{{.Gateway}}{{end}}"
    gateway = _output(["docker", "network", "inspect", "bridge", "--format", gateway_format])
    gateway = gateway.strip()
    if not gateway:
        for word in _output(["ip", "-4", "-o", "addr", "show", "docker0"]).split():
            if "/" in word and word[0].isdigit():
                gateway = word.split("/")[0]
                break
    return gateway or DEFAULT_BRIDGE_GATEWAY


def check_server(uri: str, timeout: float = SERVER_TIMEOUT) -> None:
    """Fail within `timeout` seconds when the tracking server does not answer, before any
    build or container (train.py checks again inside the container)."""
    check_tracking_uri(uri, timeout, outcome="No container was started.")


# ----------------------------------------------------------------------------
# Decisions: pure functions of the facts above (the unit tests call these)
# ----------------------------------------------------------------------------


def gpu_docker_args(setting: str, gpus: GpuInfo) -> tuple[dict[str, str], str]:
    """The --gpus docker arg for one run.

    Args:
        setting: "auto" (use the GPUs when Docker can), "none", "all" or "device=N[,M]".
        gpus: what the host offers.

    Returns:
        (docker args, one line saying what was decided).
    """
    setting = (setting or "auto").strip()
    if setting == "none":
        return {}, "GPU: GPUS=none: training runs on the CPU"
    if setting != "auto":
        return {"gpus": setting}, f"GPU: GPUS={setting}: passing --gpus {setting}"
    if gpus.runtime:
        found = f"{gpus.count} GPU(s)" if gpus.count else "GPUs"
        return {"gpus": "all"}, f"GPU: NVIDIA runtime with {found}: passing --gpus all"
    if gpus.count:
        return {}, (
            f"GPU: {gpus.count} GPU(s) on the host but Docker has no NVIDIA runtime "
            "(see doc/check_gpu_docker.md): training runs on the CPU"
        )
    return {}, "GPU: no NVIDIA runtime in Docker: training runs on the CPU"


def is_loopback(host: str) -> bool:
    """True for localhost and addresses in 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def container_tracking(uri: str, network: str, gateway: str) -> tuple[str, dict[str, str], str]:
    """How the container reaches the tracking server.

    A container on Docker's default bridge has its own loopback, so a server at
    http://localhost:5000 on the host is not there. Either the container shares the
    host's network (the default: works with a server that listens on 127.0.0.1 only),
    or, with network="bridge", the URI is rewritten to the bridge gateway address,
    which the host and the container both reach when the server listens on it
    (`mlflow server --host 0.0.0.0`).

    Args:
        uri: the tracking URI on the host.
        network: "auto" (host network for a loopback server), "host" or "bridge".
        gateway: the host's address on the Docker bridge, e.g. 172.17.0.1.

    Returns:
        (tracking URI for the host and the container, docker args, one line saying what).
    """
    if network not in ("auto", "host", "bridge"):
        raise UserError(f"DOCKER_NETWORK={network!r}: use auto, host or bridge")
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return uri, {}, f"tracking: {uri} (not a server: MLflow mounts it into the container)"
    host = parts.hostname or ""
    if network == "host" or (network == "auto" and is_loopback(host)):
        why = "is on this host's loopback" if is_loopback(host) else "(DOCKER_NETWORK=host)"
        return (
            uri,
            {"network": "host"},
            (f"tracking: {uri} {why}: the container shares the host network (--network host)"),
        )
    if is_loopback(host):
        netloc = gateway + (f":{parts.port}" if parts.port else "")
        rewritten = urlunsplit(parts._replace(netloc=netloc))
        return (
            rewritten,
            {},
            (
                f"tracking: {uri} rewritten to {rewritten}, the Docker bridge gateway "
                "(the server must listen there, e.g. mlflow server --host 0.0.0.0)"
            ),
        )
    return uri, {}, f"tracking: {uri} over Docker's default bridge network"


def user_docker_args(uid: int, gid: int) -> tuple[dict[str, str], str]:
    """Run the container as the caller, or as the image's user when the caller is root."""
    if uid == 0:
        return {"user": f"{IMAGE_UID}:{IMAGE_UID}"}, (
            f"user: caller is root: the container runs as the image's user {IMAGE_UID}:{IMAGE_UID}"
        )
    return {"user": f"{uid}:{gid}"}, f"user: the container runs as {uid}:{gid} (you)"


def storage_docker_args(storage_dir: str) -> tuple[dict[str, str], str]:
    """Mount the host data folder at the same path, when it exists."""
    if not storage_dir:
        return {}, "storage: STORAGE_DIR is empty: no data folder mounted"
    if not os.path.isdir(storage_dir):
        return {}, f"storage: {storage_dir} does not exist here: nothing mounted (set STORAGE_DIR)"
    return {"volume": f"{storage_dir}:{storage_dir}"}, (
        f"storage: {storage_dir} is mounted at the same path"
    )


# docker run flags that several names spell; a user's -A for any of them wins.
_ALIASES = {"v": "volume", "u": "user", "net": "network", "e": "env"}


@dataclass
class Plan:
    """Everything one `mlflow run` needs from the driver."""

    tracking_uri: str
    docker_args: dict[str, str | bool] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    given: set[str] = field(default_factory=set)  # -A names the user passed: left alone
    project: str = "."  # the project `mlflow run` starts: this folder, or a checkout
    run_args: list[str] = field(default_factory=list)  # the user's mlflow run options, + --run-id
    cleanup: str = ""  # a folder to remove when the run ends (a checkout of a git version)

    def decide(self, args: Mapping[str, str | bool], line: str) -> None:
        """Add a decision's docker args and its line; a -A the user gave wins over them."""
        taken = self.given & set(args)
        if taken:
            line += f" [your -A {', '.join(sorted(taken))} is used instead]"
        self.docker_args.update({k: v for k, v in args.items() if k not in taken})
        self.messages.append(line)


def make_plan(
    environ: Mapping[str, str],
    gpus: GpuInfo,
    gateway: str,
    uid: int,
    gid: int,
    user_docker_args_given: Mapping[str, object] = (),
) -> Plan:
    """Decide the docker args and tracking URI of one run.

    Args:
        environ: the environment (MLFLOW_TRACKING_URI, GPUS, DOCKER_NETWORK, STORAGE_DIR).
        gpus: what the host offers.
        gateway: the host's address on the Docker bridge.
        uid, gid: the caller's ids.
        user_docker_args_given: -A names the user passed; the driver leaves those alone.

    Returns:
        The plan. Raises UserError when MLFLOW_TRACKING_URI is not set.
    """
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise UserError(
            "MLFLOW_TRACKING_URI is not set. The container logs to a tracking server: "
            "start one (`make server` serves http://127.0.0.1:5000) and "
            "`export MLFLOW_TRACKING_URI=http://127.0.0.1:5000`."
        )
    uri, network_args, tracking_line = container_tracking(
        uri, environ.get("DOCKER_NETWORK", "auto"), gateway
    )
    plan = Plan(
        tracking_uri=uri, given={_ALIASES.get(name, name) for name in user_docker_args_given}
    )
    for args, line in (
        gpu_docker_args(environ.get("GPUS", "auto"), gpus),
        (network_args, tracking_line),
        user_docker_args(uid, gid),
        storage_docker_args(environ.get("STORAGE_DIR", DEFAULT_STORAGE_DIR)),
    ):
        plan.decide(args, line)
    return plan


def docker_arg_flags(docker_args: Mapping[str, str | bool]) -> list[str]:
    """The `mlflow run` flags for docker args: -A name=value, or -A name for a flag."""
    flags = []
    for name, value in docker_args.items():
        flags += ["-A", name if value is True else f"{name}={value}"]
    return flags


def shell_plan(plan: Plan) -> str:
    """Bash lines that project_driver.bash evaluates: the tracking URI, the project, the
    -A flags, the other mlflow run options and a folder to remove at the end."""
    flags = " ".join(shlex.quote(flag) for flag in docker_arg_flags(plan.docker_args))
    run_args = " ".join(shlex.quote(arg) for arg in plan.run_args)
    return (
        f"export MLFLOW_TRACKING_URI={shlex.quote(plan.tracking_uri)}\n"
        f"project={shlex.quote(plan.project)}\n"
        f"docker_args=({flags})\n"
        f"run_args=({run_args})\n"
        f"cleanup={shlex.quote(plan.cleanup)}\n"
        f"run_id={shlex.quote(_option(plan.run_args, '--run-id'))}\n"
    )


def user_docker_arg_names(mlflow_run_args: Sequence[str]) -> list[str]:
    """The names of the -A/--docker-args the user passed on to `mlflow run`."""
    names = []
    for index, arg in enumerate(mlflow_run_args):
        value = None
        if arg in ("-A", "--docker-args") and index + 1 < len(mlflow_run_args):
            value = mlflow_run_args[index + 1]
        elif arg.startswith("--docker-args="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-A") and len(arg) > 2:
            value = arg[2:]
        if value is not None:
            names.append(value.split("=", 1)[0])
    return names


# ----------------------------------------------------------------------------
# The image: built for exactly the code that runs
# ----------------------------------------------------------------------------


def code_image_tag(image_tag: str, content_hash: str) -> str:
    """The image's tag for one code version: NAME:code-<12 hex digits of the content hash>.

    >>> code_image_tag("py-tf2-gpu-dock-mlflow:latest", "0123456789abcdef")
    'py-tf2-gpu-dock-mlflow:code-0123456789ab'
    """
    name, colon, tag = image_tag.rpartition(":")
    repository = name if colon and "/" not in tag else image_tag
    return f"{repository}:code-{content_hash[:12]}"


def build_command(
    project_dir: Path, image_tag: str, identity: Mapping, base_image: str = ""
) -> list[str]:
    """`docker build` for a folder's code: both tags, and the code's identity as build args
    (the Dockerfile's last step checks the hash and bakes it into the image)."""
    code_tag = code_image_tag(image_tag, identity["content_hash"])
    command = ["docker", "build", "-t", image_tag, "-t", code_tag]
    build_args = {
        "BASE_IMAGE": base_image,
        "CODE_COMMIT": identity["commit"],
        "CODE_DIRTY": "true" if identity["dirty"] else "false",
        "CODE_CONTENT_HASH": identity["content_hash"],
        "CODE_IMAGE": code_tag,
    }
    for name, value in build_args.items():
        if value:
            command += ["--build-arg", f"{name}={value}"]
    return [*command, str(project_dir)]


def previous_base(image_tag: str) -> str:
    """The base the existing image was built on (its build.base_image label), or ""."""
    label = '{{index .Config.Labels "build.base_image"}}'
    base = _output(["docker", "image", "inspect", "--format", label, image_tag]).strip()
    return base if re.fullmatch(r"[\w./:@-]+", base) and base != "<no value>" else ""


def build_image(project_dir: Path = PROJECT_DIR, base_image: str = "", out=None) -> dict:
    """Build the image for the code in project_dir (NAME:latest and NAME:code-<hash>).

    Docker's layer cache makes this seconds when only code changed. Without base_image
    the image is rebuilt on the base it has (`make build BASE_IMAGE=...` is remembered).
    Docker's output goes to `out` (default: this process's stdout).

    Returns:
        The code's identity (engine.provenance.code_identity) and "line", what was built.

    Raises:
        UserError: the build failed (nothing runs on a stale image).
    """
    image_tag = read_image_tag(project_dir / "MLproject")
    identity = provenance.code_identity(project_dir)
    base_image = base_image or previous_base(image_tag)
    started = time.monotonic()
    done = subprocess.run(
        build_command(project_dir, image_tag, identity, base_image),
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    if done.returncode != 0:
        raise UserError(
            f"docker build failed (exit {done.returncode}), so nothing was run. The files "
            f"hashed here: {' '.join(identity['files'])}"
        )
    code_tag = code_image_tag(image_tag, identity["content_hash"])
    line = (
        f"image: {image_tag} (= {code_tag}) holds {provenance.describe(identity)}; "
        f"built in {time.monotonic() - started:.1f} s" + (f" on {base_image}" if base_image else "")
    )
    return {**identity, "line": line}


def code_docker_args(identity: Mapping) -> tuple[dict[str, str], str]:
    """Tell the container which code the image was built for; the run checks it at start."""
    env = f"{provenance.EXPECTED_HASH_ENV}={identity['content_hash']}"
    return {"env": env}, str(identity["line"])


# ----------------------------------------------------------------------------
# A version from git
# ----------------------------------------------------------------------------


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

    MLflow's own `mlflow run PATH -v V` checks the version out inside PATH itself, in your
    working copy, so the driver always runs a fresh checkout instead.

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


# ----------------------------------------------------------------------------
# Artifacts in a local folder
# ----------------------------------------------------------------------------


def local_folder(artifact_location: str, base: Path = PROJECT_DIR) -> Path | None:
    """The host folder of a local artifact location; None for a remote store."""
    return local_path(artifact_location, base)


def artifact_docker_args(
    experiment: str, folder: Path, owner: tuple[int, int]
) -> tuple[dict[str, str], str]:
    """Mount an experiment's local artifact folder and run the container as its owner.

    MLflow mounts only the run's own artifact folder, which Docker creates as root when it
    is missing, and not the experiment folder where MLflow 3 writes logged models
    (models/). So the driver mounts the experiment folder at the same path, runs the
    container as the folder's owner (root included), and creates the run first.
    """
    uid, gid = owner
    return {"mount": f"type=bind,source={folder},target={folder}", "user": f"{uid}:{gid}"}, (
        f"artifacts: experiment '{experiment}' keeps artifacts in the local folder {folder} "
        f"(made without a server): mounted at the same path, the container runs as its owner "
        f"{uid}:{gid}, and the run is created first so that its folder is theirs"
    )


def parse_run_options(project_uri: str, args: Sequence[str]) -> dict:
    """The user's `mlflow run` options, parsed by mlflow's own command line (its env vars,
    such as MLFLOW_EXPERIMENT_NAME, included)."""
    import click
    from mlflow.cli import run as run_command

    try:
        options = run_command.make_context("mlflow run", [project_uri, *args]).params
    except click.ClickException as error:
        raise UserError(f"mlflow run {' '.join(args)}: {error.format_message()}") from None
    options["parameters"] = dict(item.split("=", 1) for item in options["param_list"])
    return options


def _option(args: Sequence[str], name: str) -> str:
    """The value of `--name VALUE` or `--name=VALUE` in command-line options, or ""."""
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return ""


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
    name = _option(args, "--experiment-name") or environ.get("MLFLOW_EXPERIMENT_NAME", "")
    experiment_id = _option(args, "--experiment-id") or environ.get("MLFLOW_EXPERIMENT_ID", "")
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
    from mlflow import MlflowClient

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
    if _option(args, "--run-id"):
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


def create_run_first(
    project_dir: Path, options: Mapping, parameters: Mapping[str, str], user: str
) -> str:
    """Create the run as `mlflow run` would (same tags and parameters, by MLflow's own
    functions) and its local artifact folder, owned by the container's user; `mlflow run
    --run-id` then uses it. Docker would otherwise create the folder as root.

    Returns:
        The run id.
    """
    import mlflow
    from mlflow.projects.utils import fetch_and_validate_project, get_or_create_run

    mlflow.set_tracking_uri(options["tracking_uri"])
    entry_point = options["entry_point"]
    work_dir = fetch_and_validate_project(str(project_dir), None, entry_point, dict(parameters))
    run = get_or_create_run(
        None, str(project_dir), options["experiment_id"], work_dir, None, entry_point,
        dict(parameters),
    )  # fmt: skip
    run_folder = local_folder(run.info.artifact_uri)
    if run_folder is None:  # artifacts go through the server: no folder to make here
        return run.info.run_id
    run_folder.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0 and re.fullmatch(r"\d+:\d+", user):
        uid, gid = (int(part) for part in user.split(":"))
        for path in (run_folder.parent, run_folder):
            os.chown(path, uid, gid)
    return run.info.run_id


def prepare_run(
    plan: Plan, project_dir: Path, args: Sequence[str], base_image: str, out=None
) -> dict | None:
    """Build the image for the code in project_dir and plan where artifacts land.

    Returns:
        local_artifacts()'s answer: the options to create runs with, or None.
    """
    identity = build_image(project_dir, base_image, out=out)
    plan.decide(*code_docker_args(identity))
    return local_artifacts(plan, project_dir, args)


def first_run_options(plan: Plan, project_dir: Path, args: Sequence[str]) -> dict:
    """create_run_first()'s options for an experiment of any kind (made if missing), so
    that a run that may be retried has its id before it starts."""
    experiment = find_experiment(plan.tracking_uri, args, os.environ)
    if experiment is None:  # `mlflow run` would make it; make it now
        from mlflow import MlflowClient

        name = _option(args, "--experiment-name") or os.environ.get("MLFLOW_EXPERIMENT_NAME")
        experiment = {"experiment_id": MlflowClient(plan.tracking_uri).create_experiment(name)}
    options = parse_run_options(str(project_dir), args)
    return {**options, "experiment_id": experiment["experiment_id"],
            "tracking_uri": plan.tracking_uri}  # fmt: skip


def resumable_checkpoint(run_id: str) -> Path | None:
    """A failed run's checkpoint folder when it is on this host, else None.

    Training tags each run with its checkpoint folder (`checkpoint_dir`); under Docker
    it is on this host at the same path when it lies in the mounted STORAGE_DIR (the
    default /storage/checkpoints does).
    """
    from mlflow import MlflowClient

    folder = MlflowClient().get_run(run_id).data.tags.get("checkpoint_dir", "")
    if folder and (Path(folder) / CHECKPOINT_STATE).is_file():
        return Path(folder)
    return None


def retry_plan(run_id: str) -> tuple[dict[str, str], str, str]:
    """How to try a failed run again: resume it into the same run from its checkpoint,
    or, with none on this host, start it over as a new run.

    Returns:
        (extra parameters, the run id to reuse or "", a line saying which).
    """
    folder = resumable_checkpoint(run_id)
    if folder is None:
        return {}, "", f"retry: run {run_id} left no checkpoint here; starting it over"
    return (
        {"resume_run_id": run_id},
        run_id,
        f"retry: resuming run {run_id} from its checkpoint in {folder}",
    )


# ----------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------


def parse_param_values(items: Sequence[str]) -> dict[str, list[str]]:
    """-P name=v1,v2 items to {name: [v1, v2]} (a YAML grid file takes values with commas).

    Raises:
        UserError: for an item without "=" or with an empty value list.
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"-P {item!r}: write -P name=value or -P name=v1,v2,...")
        split = [value.strip() for value in values.split(",")]
        if not all(split):
            raise UserError(f"-P {item!r}: a value list must not have empty entries")
        grid[name.strip()] = split
    return grid


def load_grid_file(path: Path) -> dict[str, list[str]]:
    """A YAML grid: `name: value` or `name: [v1, v2]`, optionally under `parameters:`.

    Example:
        parameters:
          data_source: demo
          epochs: [1, 2]
          learning_rate: [0.001, 0.01]
    """
    spec = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(spec, dict) and set(spec) == {"parameters"}:
        spec = spec["parameters"]
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping of parameter names to values or lists")
    grid = {}
    for name, values in spec.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise UserError(f"{path}: {name} has an empty list of values")
        grid[str(name)] = [_yaml_scalar(value) for value in values]
    return grid


def _yaml_scalar(value: object) -> str:
    """A YAML value as mlflow run's -P takes it (true/false for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def expand_grid(grid: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """Every combination of the values, the first parameter varying slowest.

    >>> expand_grid({"epochs": ["1", "2"], "learning_rate": ["0.1"]})
    [{'epochs': '1', 'learning_rate': '0.1'}, {'epochs': '2', 'learning_rate': '0.1'}]
    """
    names = list(grid)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*grid.values())]


def check_param_names(points: Sequence[Mapping[str, str]], known: Sequence[str]) -> None:
    """Fail before launching anything when a parameter is not in MLproject's main."""
    unknown = sorted({name for point in points for name in point} - set(known))
    if unknown:
        raise UserError(
            f"unknown parameter(s) {', '.join(unknown)}; MLproject's main entry point "
            f"takes: {', '.join(known)}"
        )


def run_gpu_args(slot: int, gpus: GpuInfo, setting: str) -> dict[str, str]:
    """The --gpus arg of the run in `slot`: its own GPU when there are several."""
    if setting in ("auto", "") and gpus.runtime and gpus.count > 1:
        return {"gpus": f"device={slot % gpus.count}"}
    return gpu_docker_args(setting, gpus)[0]


def format_table(rows: Sequence[Mapping[str, object]]) -> str:
    """A plain text table with a header; columns are the union of the rows' keys."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    cells = [[_cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(r[i]) for r in cells]) for i, column in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_sweep(
    points: Sequence[Mapping[str, str]],
    base_docker_args: Mapping[str, str | bool],
    gpus: GpuInfo,
    gpu_setting: str,
    parallel: int,
    experiment_name: str | None,
    poll_seconds: float = 2.0,
    project_dir: Path = PROJECT_DIR,
    first_run: Callable[[Mapping[str, str]], str] | None = None,
    retries: int = 0,
) -> list[dict[str, object]]:
    """Launch the runs, at most `parallel` at once, each on its own GPU slot; wait for all.

    Args:
        project_dir: the project each run starts (this folder, or a checkout of a version).
        first_run: for an experiment with a local artifact folder, creates each run just
            before its launch (create_run_first) and returns its id.
        retries: how many times a failed run is tried again (retry_plan: resumed from its
            checkpoint into the same run, else started over), at the front of the queue.

    Returns:
        One row per run: its parameters, run id, status and final metrics.
    """
    import mlflow
    import mlflow.projects

    # Asynchronous runs start `mlflow run` in a subprocess: the venv's mlflow must be on PATH.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]
    # (index, parameters, the run id to reuse: a resumed run's, else "")
    pending: list[tuple[int, dict[str, str], str]] = [
        (i, dict(p), "") for i, p in enumerate(points)
    ]
    tries = dict.fromkeys(range(len(points)), 0)
    free_slots = list(range(parallel))
    running: dict[int, tuple[int, object]] = {}  # slot -> (index, submitted run)
    results: dict[int, dict[str, object]] = {}
    while pending or running:
        while pending and free_slots:
            index, params, reuse = pending.pop(0)
            slot = free_slots.pop(0)
            docker_args = dict(base_docker_args) | run_gpu_args(slot, gpus, gpu_setting)
            print(
                f"[{index + 1}/{len(points)}] launching {params} "
                f"({' '.join(docker_arg_flags(docker_args))})",
                flush=True,
            )
            try:
                if reuse:
                    created = {"run_id": reuse}
                else:
                    created = {"run_id": first_run(params)} if first_run else {}
                submitted = mlflow.projects.run(
                    str(project_dir),
                    entry_point="main",
                    parameters=dict(params),
                    docker_args=docker_args,
                    experiment_name=experiment_name,
                    synchronous=False,
                    **created,
                )
            except Exception as error:  # a launch failure fails that run, not the sweep
                results[index] = {**params, "run_id": "", "status": f"NOT STARTED: {error}"}
                free_slots.append(slot)
                continue
            running[slot] = (index, submitted)
        time.sleep(poll_seconds)
        for slot, (index, submitted) in list(running.items()):
            status = submitted.get_status()
            if status in ("FINISHED", "FAILED", "KILLED"):
                print(f"[{index + 1}/{len(points)}] run {submitted.run_id} {status}", flush=True)
                results[index] = {**points[index], "run_id": submitted.run_id, "status": status}
                del running[slot]
                free_slots.append(slot)
                if status == "FAILED" and tries[index] < retries:
                    tries[index] += 1
                    extra, reuse, line = retry_plan(submitted.run_id)
                    print(f"[{index + 1}/{len(points)}] {line} "
                          f"(try {tries[index] + 1} of {retries + 1})", flush=True)  # fmt: skip
                    pending.insert(0, (index, {**points[index], **extra}, reuse))
    client = mlflow.MlflowClient()
    rows = []
    for index in range(len(points)):
        row = results[index]
        if row["run_id"]:
            metrics = client.get_run(str(row["run_id"])).data.metrics
            row.update({name: metrics[name] for name in sorted(metrics)})
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------
# Tuning: engine.tune's workers as containers, one GPU each
# ----------------------------------------------------------------------------


def docker_run_flags(docker_args: Mapping[str, str | bool]) -> list[str]:
    """`docker run` flags for docker args: --name=value, or --name for a flag."""
    return [
        f"--{name}" if value is True else f"--{name}={value}" for name, value in docker_args.items()
    ]


def tune_storage_problem(storage: str, storage_dir: str, tracking_uri: str) -> str:
    """Why containers could not share this study storage and tracking URI, or ""."""
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return (
            f"the trials log to {tracking_uri}, which a container cannot reach; "
            "start a tracking server (`make server`) and export "
            "MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
        )
    if "://" in storage:
        return (
            ""
            if urlsplit(storage).scheme.startswith(("postgresql", "mysql"))
            else (
                f"the study storage {storage} is not shared with the containers; "
                "use a postgresql:// URL or a journal file under STORAGE_DIR"
            )
        )
    folder = os.path.realpath(storage_dir) if storage_dir else ""
    if not folder or not os.path.realpath(storage).startswith(folder + os.sep):
        return (
            f"the study journal {storage} is not under STORAGE_DIR ({storage_dir or 'unset'}), "
            "the one folder mounted into the containers; give --storage a path there, or a "
            "postgresql:// URL"
        )
    return ""


class DockerWorkers:
    """engine.tune's launcher for `make tune-docker`: worker N runs in the training image
    with --gpus device=N (mod the GPUs), the plan's network, user, /storage and code."""

    def __init__(self, plan: Plan, gpus: GpuInfo, gpu_setting: str, image: str,
                 storage_dir: str):  # fmt: skip
        self.plan, self.gpus, self.gpu_setting = plan, gpus, gpu_setting
        self.image, self.storage_dir = image, storage_dir

    def check(self, settings) -> None:
        from engine.config import UserError

        problem = tune_storage_problem(settings.storage, self.storage_dir, self.plan.tracking_uri)
        if problem:
            raise UserError(f"Docker workers: {problem}. No container was started.")
        user = str(self.plan.docker_args.get("user", ""))
        if "://" not in settings.storage and os.getuid() == 0 and re.fullmatch(r"\d+:\d+", user):
            # the containers' user writes the journal and its lock file beside it
            uid, gid = (int(part) for part in user.split(":"))
            journal = Path(settings.storage)
            journal.parent.mkdir(parents=True, exist_ok=True)
            journal.touch()
            for path in (journal.parent, journal):
                os.chown(path, uid, gid)

    def command(self, worker: int, settings_json: str) -> tuple[list[str], dict[str, str]]:
        return tune_worker_command(worker, settings_json, self.plan, self.gpus,
                                   self.gpu_setting, self.image), dict(os.environ)  # fmt: skip


def tune_worker_command(worker: int, settings_json: str, plan: Plan, gpus: GpuInfo,
                        gpu_setting: str, image: str) -> list[str]:  # fmt: skip
    """`docker run` of one tuning worker: its own GPU, the plan's docker args, the settings."""
    from engine.tune import SETTINGS_ENV

    docker_args = dict(plan.docker_args) | run_gpu_args(worker, gpus, gpu_setting)
    return [
        "docker", "run", "--rm", *docker_run_flags(docker_args),
        "--env", f"MLFLOW_TRACKING_URI={plan.tracking_uri}",
        "--env", f"{SETTINGS_ENV}={settings_json}",
        image, "python", "-m", "engine.tune", "worker", "-", str(worker),
    ]  # fmt: skip


def run_tune(argv: Sequence[str], base_image: str) -> int:
    """`make tune-docker`: plan, build the image for the code here, run engine.tune with
    its workers as containers."""
    from engine import tune

    plan, gpus = host_plan()
    os.environ["MLFLOW_TRACKING_URI"] = plan.tracking_uri
    shown = _say(plan, 0, sys.stdout)
    identity = build_image(PROJECT_DIR, base_image)
    plan.decide(*code_docker_args(identity))
    _say(plan, shown, sys.stdout)
    image = code_image_tag(read_image_tag(), identity["content_hash"])
    storage_dir = os.environ.get("STORAGE_DIR", DEFAULT_STORAGE_DIR)
    launcher = DockerWorkers(plan, gpus, os.environ.get("GPUS", "auto"), image, storage_dir)
    return tune.main(list(argv), launcher=launcher)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def host_plan(mlflow_run_args: Sequence[str] = ()) -> tuple[Plan, GpuInfo]:
    """The plan for this host: gathers the facts, decides, checks the server."""
    gpus = detect_gpus()
    environ = dict(os.environ)
    gateway = bridge_gateway() if environ.get("DOCKER_NETWORK") == "bridge" else ""
    plan = make_plan(
        environ,
        gpus,
        gateway,
        os.getuid(),
        os.getgid(),
        user_docker_arg_names(mlflow_run_args),
    )
    try:
        check_server(plan.tracking_uri)
    except UserError as error:
        if plan.tracking_uri != environ.get("MLFLOW_TRACKING_URI"):
            raise UserError(
                f"{error} With DOCKER_NETWORK=bridge the server must listen on the bridge "
                "gateway (mlflow server --host 0.0.0.0); a server on 127.0.0.1 only needs "
                "DOCKER_NETWORK=auto (host network)."
            ) from None
        raise
    return plan, gpus


def checkout_if_asked(plan: Plan, url: str, version: str) -> Path:
    """The project folder a run starts: this one, or a fresh checkout of a git version
    (--git-url URL, --version V; a version alone means this folder's repository)."""
    if not (url or version):
        return PROJECT_DIR
    plan.cleanup = tempfile.mkdtemp(prefix="mlflow-version-")
    project_dir = Path(plan.cleanup) / "project"
    source = url or str(PROJECT_DIR)
    commit = checkout_version(source, version, project_dir)
    plan.project = str(project_dir)
    plan.messages.append(f"version: {version or 'HEAD'} of {source} is commit {commit}")
    return project_dir


def _say(plan: Plan, shown: int, stream) -> int:
    """Print the plan's lines not shown yet; returns how many are shown now."""
    for line in plan.messages[shown:]:
        print(line, file=stream, flush=True)
    return len(plan.messages)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "plan",
        help="check the server, build the image, print the bash lines project_driver.bash "
        "evaluates (messages on stderr); --git-url URL --version V pick a version from git, "
        "the mlflow run options that follow are passed on",
    )
    commands.add_parser(
        "check", help="only check that the tracking server answers (make run does, before building)"
    )
    build = commands.add_parser("build", help="build the image for the code in a folder")
    build.add_argument("--project-dir", type=Path, default=PROJECT_DIR)
    build.add_argument("--base-image", default=os.environ.get("BASE_IMAGE", ""))
    commands.add_parser(
        "tune", help="python -m engine.tune with each worker a container on its own GPU; "
        "the tune and train flags that follow are passed on",
    )  # fmt: skip
    sweep = commands.add_parser("sweep", help="run a grid of parameter values, several at once")
    sweep.add_argument("-P", "--param", action="append", default=[], metavar="NAME=V1,V2")
    sweep.add_argument("--grid", type=Path, help="YAML file of parameter values")
    sweep.add_argument(
        "--parallel", type=int, default=0, help="runs at once (default: GPUs, or 2 on the CPU)"
    )
    sweep.add_argument("--experiment-name", default=os.environ.get("MLFLOW_EXPERIMENT_NAME"))
    sweep.add_argument("--git-url", default="", help="sweep a version from this repository")
    sweep.add_argument("--version", default="", help="the commit, branch or tag to sweep")
    sweep.add_argument(
        "--retries", type=int, default=int(os.environ.get("RETRIES") or 0),
        help="try a failed run again up to this many times, resuming it from its checkpoint",
    )  # fmt: skip
    # `plan` takes any `mlflow run` options after it, which argparse would reject.
    args = parser.parse_args(argv[:1] if argv[:1] in (["plan"], ["tune"]) else argv)
    base_image = os.environ.get("BASE_IMAGE", "")

    plan = None
    try:
        if args.command == "plan":
            url, version, rest = split_version_args(argv[1:])
            plan, _ = host_plan(rest)
            plan.run_args = list(rest)
            project_dir = checkout_if_asked(plan, url, version)
            shown = _say(plan, 0, sys.stderr)
            local = prepare_run(plan, project_dir, rest, base_image, out=sys.stderr)
            retry_of = os.environ.get("RETRY_OF", "")
            extra, reuse, line = retry_plan(retry_of) if retry_of else ({}, "", "")
            if line:
                plan.messages.append(line)
            if reuse:  # resume into the same run: `mlflow run --run-id` reopens it
                plan.run_args += ["--run-id", reuse, "-P", f"resume_run_id={reuse}"]
            elif local or int(os.environ.get("RETRIES") or 0) > 0:
                local = local or first_run_options(plan, project_dir, rest)
                user = str(plan.docker_args.get("user", ""))
                run_id = create_run_first(project_dir, local, local["parameters"], user)
                plan.run_args += ["--run-id", run_id]
            _say(plan, shown, sys.stderr)
            sys.stdout.write(shell_plan(plan))
            return 0
        if args.command == "tune":
            return run_tune(["train", *argv[1:]], base_image)
        if args.command == "check":
            host_plan()
            return 0
        if args.command == "build":
            identity = build_image(args.project_dir, args.base_image)
            print(identity["line"])
            return 0

        grid = load_grid_file(args.grid) if args.grid else {}
        grid.update(parse_param_values(args.param))
        if not grid:
            raise UserError("nothing to sweep: give -P name=v1,v2 or --grid FILE")
        points = expand_grid(grid)
        spec = yaml.safe_load((PROJECT_DIR / "MLproject").read_text())
        check_param_names(points, list(spec["entry_points"]["main"]["parameters"]))
        plan, gpus = host_plan()
        os.environ["MLFLOW_TRACKING_URI"] = plan.tracking_uri
        project_dir = checkout_if_asked(plan, args.git_url, args.version)
        shown = _say(plan, 0, sys.stdout)
        experiment = ["--experiment-name", args.experiment_name] if args.experiment_name else []
        local = prepare_run(plan, project_dir, experiment, base_image)
        _say(plan, shown, sys.stdout)
        user = str(plan.docker_args.get("user", ""))
        first_run = (
            (lambda params: create_run_first(project_dir, local, params, user)) if local else None
        )
        parallel = args.parallel or (gpus.count if gpus.runtime and gpus.count else 2)
        print(f"sweep: {len(points)} runs, {parallel} at once, image {read_image_tag()}")
        gpu_setting = os.environ.get("GPUS", "auto")
        rows = run_sweep(
            points,
            plan.docker_args,
            gpus,
            gpu_setting,
            parallel,
            args.experiment_name,
            project_dir=project_dir,
            first_run=first_run,
            retries=args.retries,
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        if plan is not None and plan.cleanup:
            shutil.rmtree(plan.cleanup, ignore_errors=True)
        return 2
    finally:
        if args.command == "sweep" and plan is not None and plan.cleanup:
            shutil.rmtree(plan.cleanup, ignore_errors=True)
    print()
    print(format_table(rows))
    failed = [row for row in rows if row["status"] != "FINISHED"]
    if failed:
        print(f"\n{len(failed)} of {len(rows)} runs did not finish", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
