"""What this host offers: GPUs for containers, the Docker bridge gateway, and whether
the tracking server answers. Each asks a command or the network; host.plan decides."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from engine.common import check_tracking_uri

# Docker's default bridge gateway, used when `docker network inspect` does not say.
DEFAULT_BRIDGE_GATEWAY = "172.17.0.1"
# Seconds to wait for the tracking server before giving up (fail fast, not after 255 s).
SERVER_TIMEOUT = 5.0


@dataclass
class GpuInfo:
    """What the host offers for GPUs in containers."""

    runtime: bool  # Docker can start containers with --gpus (NVIDIA runtime or toolkit)
    count: int  # GPUs that nvidia-smi lists on the host (0 when it is missing)


def command_output(command: Sequence[str], timeout: float = 20) -> str:
    """stdout of a command, or "" when it is missing or fails.

    Args:
        command: the program and its arguments.
        timeout: seconds to wait for it.
    """
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


def detect_gpus() -> GpuInfo:
    """Ask Docker for its runtimes and nvidia-smi for the GPUs."""
    runtimes = command_output(["docker", "info", "--format", "{{json .Runtimes}}"])
    toolkit = any(
        shutil.which(name)
        for name in ("nvidia-container-runtime-hook", "nvidia-container-toolkit", "nvidia-ctk")
    )
    listing = command_output(["nvidia-smi", "-L"])
    count = sum(1 for line in listing.splitlines() if line.startswith("GPU "))
    return GpuInfo(runtime="nvidia" in runtimes or (toolkit and count > 0), count=count)


def bridge_gateway() -> str:
    """The host's address on Docker's default bridge (where containers find the host)."""
    gateway_format = "{{range .IPAM.Config}}{{.Gateway}}{{end}}"
    gateway = command_output(["docker", "network", "inspect", "bridge", "--format", gateway_format])
    gateway = gateway.strip()
    if not gateway:
        for word in command_output(["ip", "-4", "-o", "addr", "show", "docker0"]).split():
            if "/" in word and word[0].isdigit():
                gateway = word.split("/")[0]
                break
    return gateway or DEFAULT_BRIDGE_GATEWAY


def check_server(uri: str, timeout: float = SERVER_TIMEOUT) -> None:
    """Fail within `timeout` seconds when the tracking server does not answer, before any
    build or container (train.py checks again inside the container).

    Raises:
        UserError: the URI is not a tracking URI, or its server does not answer.
    """
    check_tracking_uri(uri, timeout, outcome="No container was started.")
