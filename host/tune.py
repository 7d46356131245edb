"""`make tune-docker`: engine.tune's search, each worker a container in the training
image on its own GPU (worker N: --gpus device=N mod the GPUs), with the same plan as a
run (network, user, /storage, the code's hash). engine.tune starts the workers through
DockerWorkers and relays their output; the study storage must be one the containers
share (a postgresql:// URL, or a journal file under STORAGE_DIR).

engine.tune is imported when tuning starts: the host package stays light to import.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.common import PROJECT_DIR
from engine.config import UserError
from host.facts import GpuInfo
from host.image import build_image, code_docker_args, code_image_tag, read_image_tag
from host.plan import DEFAULT_STORAGE_DIR, Plan, docker_arg_words, host_plan, run_gpu_args


def tune_storage_problem(storage: str, storage_dir: str, tracking_uri: str) -> str:
    """Why containers could not share this study storage and tracking URI, or ""."""
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return (
            f"the trials log to {tracking_uri}, which a container cannot reach; "
            "start a tracking server (`make server`) and export "
            "MLFLOW_TRACKING_URI=http://127.0.0.1:5000"
        )
    if "://" in storage:
        if urlsplit(storage).scheme.startswith(("postgresql", "mysql")):
            return ""
        return (
            f"the study storage {storage} is not shared with the containers; "
            "use a postgresql:// URL or a journal file under STORAGE_DIR"
        )
    folder = os.path.realpath(storage_dir) if storage_dir else ""
    if not folder or not os.path.realpath(storage).startswith(folder + os.sep):
        return (
            f"the study journal {storage} is not under STORAGE_DIR ({storage_dir or 'unset'}), "
            "the one folder mounted into the containers; give --storage a path there, or a "
            "postgresql:// URL"
        )
    return ""


def tune_worker_command(
    worker: int, settings_json: str, plan: Plan, gpus: GpuInfo, gpu_setting: str, image: str
) -> list[str]:
    """`docker run` of one tuning worker: its own GPU, the plan's docker args, the settings."""
    from engine.tune import SETTINGS_ENV  # engine.tune is loaded only when tuning

    docker_args = dict(plan.docker_args) | run_gpu_args(worker, gpus, gpu_setting)
    flags = [f"--{word}" for word in docker_arg_words(docker_args)]
    env = ["--env", f"MLFLOW_TRACKING_URI={plan.tracking_uri}"]
    env += ["--env", f"{SETTINGS_ENV}={settings_json}"]
    worker_command = ["python", "-m", "engine.tune", "worker", "-", str(worker)]
    return ["docker", "run", "--rm", *flags, *env, image, *worker_command]


class DockerWorkers:
    """engine.tune's launcher for `make tune-docker`: worker N runs in the training image
    with --gpus device=N (mod the GPUs), the plan's network, user, /storage and code.

    Args:
        plan: the docker args and tracking URI every worker shares.
        gpus, gpu_setting: a worker's GPU (run_gpu_args).
        image: the image of the code here (NAME:code-<hash>).
        storage_dir: the folder mounted into the containers (STORAGE_DIR).
    """

    def __init__(
        self, plan: Plan, gpus: GpuInfo, gpu_setting: str, image: str, storage_dir: str
    ) -> None:
        self.plan, self.gpus, self.gpu_setting = plan, gpus, gpu_setting
        self.image, self.storage_dir = image, storage_dir

    def check(self, settings: Any) -> None:
        """Before any worker starts: the study storage is one the containers share, and
        a journal file is writable by the containers' user."""
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
        """The command that starts worker N, and its environment."""
        command = tune_worker_command(
            worker, settings_json, self.plan, self.gpus, self.gpu_setting, self.image
        )
        return command, dict(os.environ)


def tune_main(argv: Sequence[str], base_image: str) -> int:
    """`make tune-docker`: plan, build the image for the code here, run engine.tune with
    its workers as containers.

    Args:
        argv: engine.tune's command line ("train" and the tune and train flags).
        base_image: the image to build on ("" keeps the image's own).
    """
    from engine import tune  # loaded only when tuning starts: the host stays light

    plan, gpus = host_plan()
    os.environ["MLFLOW_TRACKING_URI"] = plan.tracking_uri
    plan.say(sys.stdout)
    identity = build_image(PROJECT_DIR, base_image)
    plan.decide(*code_docker_args(identity))
    plan.say(sys.stdout)
    image = code_image_tag(read_image_tag(), identity["content_hash"])
    storage_dir = os.environ.get("STORAGE_DIR", DEFAULT_STORAGE_DIR)
    launcher = DockerWorkers(plan, gpus, os.environ.get("GPUS", "auto"), image, storage_dir)
    return tune.main(list(argv), launcher=launcher)
