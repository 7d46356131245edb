"""A run's docker args, decided from the host's facts, each decision said in one line.

The decisions are pure functions of the facts (the unit tests call them without
Docker); host_plan() gathers the facts of this host and checks the tracking server.
    GPU       --gpus all when Docker has an NVIDIA runtime, else the CPU (GPUS overrides)
    tracking  a server on this host's loopback is reached with --network host, or, with
              DOCKER_NETWORK=bridge, through the Docker bridge gateway address
    user      the caller's uid:gid (the image's `trainer` user when the caller is root)
    storage   STORAGE_DIR (default /storage) mounted at the same path when it exists
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import urlsplit, urlunsplit

from engine.config import UserError
from host.facts import GpuInfo, bridge_gateway, check_server, detect_gpus

# The uid of the `trainer` user that Dockerfile creates (its USER_UID build arg).
IMAGE_UID = 1000
DEFAULT_STORAGE_DIR = "/storage"
# docker run flags that several names spell; a user's -A for any of them wins.
_ALIASES = {"v": "volume", "u": "user", "net": "network", "e": "env"}


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


def run_gpu_args(slot: int, gpus: GpuInfo, setting: str) -> dict[str, str]:
    """The --gpus arg of the run (or tuning worker) in `slot`: its own GPU when there are
    several, else gpu_docker_args()'s."""
    if setting in ("auto", "") and gpus.runtime and gpus.count > 1:
        return {"gpus": f"device={slot % gpus.count}"}
    return gpu_docker_args(setting, gpus)[0]


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
        line = f"tracking: {uri} {why}: the container shares the host network (--network host)"
        return uri, {"network": "host"}, line
    if is_loopback(host):
        netloc = gateway + (f":{parts.port}" if parts.port else "")
        rewritten = urlunsplit(parts._replace(netloc=netloc))
        line = (
            f"tracking: {uri} rewritten to {rewritten}, the Docker bridge gateway "
            "(the server must listen there, e.g. mlflow server --host 0.0.0.0)"
        )
        return rewritten, {}, line
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


@dataclass
class Plan:
    """Everything the `mlflow run` of a run (or each run of a sweep) needs from the host."""

    tracking_uri: str
    docker_args: dict[str, str | bool] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    given: set[str] = field(default_factory=set)  # -A names the user passed: left alone
    project: str = "."  # the project `mlflow run` starts: this folder, or a checkout
    run_args: list[str] = field(default_factory=list)  # the user's mlflow run options
    cleanup: str = ""  # a folder to remove when the run ends (a checkout of a git version)
    shown: int = 0  # how many messages say() has printed

    def decide(self, args: Mapping[str, str | bool], line: str) -> None:
        """Add a decision's docker args and its line; a -A the user gave wins over them."""
        taken = self.given & set(args)
        if taken:
            line += f" [your -A {', '.join(sorted(taken))} is used instead]"
        self.docker_args.update({k: v for k, v in args.items() if k not in taken})
        self.messages.append(line)

    def say(self, stream: TextIO) -> None:
        """Print the lines of the decisions made since the last say()."""
        for line in self.messages[self.shown :]:
            print(line, file=stream, flush=True)
        self.shown = len(self.messages)


def make_plan(
    environ: Mapping[str, str],
    gpus: GpuInfo,
    gateway: str,
    uid: int,
    gid: int,
    user_docker_args_given: Sequence[str] = (),
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
    network = environ.get("DOCKER_NETWORK", "auto")
    uri, network_args, tracking_line = container_tracking(uri, network, gateway)
    given = {_ALIASES.get(name, name) for name in user_docker_args_given}
    plan = Plan(tracking_uri=uri, given=given)
    for args, line in (
        gpu_docker_args(environ.get("GPUS", "auto"), gpus),
        (network_args, tracking_line),
        user_docker_args(uid, gid),
        storage_docker_args(environ.get("STORAGE_DIR", DEFAULT_STORAGE_DIR)),
    ):
        plan.decide(args, line)
    return plan


def host_plan(mlflow_run_args: Sequence[str] = ()) -> tuple[Plan, GpuInfo]:
    """The plan for this host: gathers the facts, decides, checks the server.

    Args:
        mlflow_run_args: the user's `mlflow run` options (their -A names win).

    Returns:
        (the plan, the GPUs found).
    """
    gpus = detect_gpus()
    environ = dict(os.environ)
    gateway = bridge_gateway() if environ.get("DOCKER_NETWORK") == "bridge" else ""
    given = user_docker_arg_names(mlflow_run_args)
    plan = make_plan(environ, gpus, gateway, os.getuid(), os.getgid(), given)
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


def docker_arg_words(docker_args: Mapping[str, str | bool]) -> list[str]:
    """Each docker arg as `mlflow run -A` and `docker run --` spell it: name=value, or
    name alone for a flag (value True)."""
    return [name if value is True else f"{name}={value}" for name, value in docker_args.items()]


def docker_arg_flags(docker_args: Mapping[str, str | bool]) -> list[str]:
    """The `mlflow run` flags for docker args: -A name=value, or -A name for a flag."""
    return [flag for word in docker_arg_words(docker_args) for flag in ("-A", word)]


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


def option(args: Sequence[str], name: str) -> str:
    """The value of `--name VALUE` or `--name=VALUE` in command-line options, or ""."""
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return ""
