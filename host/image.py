"""The training image: its tag (written once, in MLproject's docker_env) and the build
for exactly the code that runs (NAME:latest and NAME:code-<hash>, the code's commit and
content hash baked in; see engine/provenance.py and doc/docker.md)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import yaml

from engine import provenance
from engine.common import PROJECT_DIR
from engine.config import UserError
from host.facts import command_output


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
    base = command_output(["docker", "image", "inspect", "--format", label, image_tag]).strip()
    return base if re.fullmatch(r"[\w./:@-]+", base) and base != "<no value>" else ""


def build_image(
    project_dir: Path = PROJECT_DIR, base_image: str = "", out: TextIO | None = None
) -> dict:
    """Build the image for the code in project_dir (NAME:latest and NAME:code-<hash>).

    Docker's layer cache makes this seconds when only code changed. Without base_image
    the image is rebuilt on the base it has (`make build BASE_IMAGE=...` is remembered).

    Args:
        project_dir: the folder whose code is built (its Dockerfile and MLproject).
        base_image: the image to build on; "" keeps the previous base, else the Dockerfile's.
        out: where Docker's output goes (default: this process's stdout).

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
