"""`make tune-docker` and `make kube-tune WORKERS=N`: engine.tune's search, its workers
in the training image.

tune-docker: each worker a container on its own GPU (worker N: --gpus device=N mod
the GPUs), with the same plan as a run (network, user, /storage, the code's hash).
engine.tune starts the workers through DockerWorkers and relays their output; the
study storage must be one the containers share (a postgresql:// URL, or a journal file
under STORAGE_DIR). kube-tune: the workers are the pods of one Indexed Job
(KubeWorkers) that MLflow's Kubernetes backend submits; the study is on PostgreSQL.

engine.tune is imported when tuning starts: the host package stays light to import.
"""

from __future__ import annotations

import argparse
import json
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
from host.kube import check_workers, tune_job, write_rendered
from host.launch import mlflow_command
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


# ----------------------------------------------------------------------------
# make kube-tune WORKERS=N: the workers are one Indexed Job on Kubernetes
# ----------------------------------------------------------------------------

TUNE_ENTRY = "kubernetes/tune_worker.py"  # `mlflow run -e`: one tuning worker per pod


def kube_tune_problem(argv: Sequence[str], tracking_uri: str) -> str:
    """Why pods could not share this study and tracking server, or "": the study must be
    on the team PostgreSQL (--storage postgresql://...), the runs on a tracking server."""
    storage = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--storage"), "")
    storage = next((a.split("=", 1)[1] for a in argv if a.startswith("--storage=")), storage)
    if urlsplit(storage).scheme.split("+")[0] != "postgresql":
        return (
            f"the study storage must be the team PostgreSQL, which every pod reaches: give "
            f"ARGS=\"--storage postgresql://USER@HOST/DB ...\" (got '{storage or 'none'}')"
        )
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return f"the trials log to {tracking_uri or 'nowhere'}; the pods need a tracking server"
    return ""


class KubeWorkers:
    """engine.tune's launcher for `make kube-tune WORKERS=N`: the N workers are the pods
    of one Indexed Job that `mlflow run --backend kubernetes` submits (building the image
    of the code in src, as make kube-run does) and follows to its end.

    engine.tune starts one process for the lot (`processes`), and does not load the data
    here first (`data_here`): it is on the cluster's volume, where the pods read it.
    """

    processes = 1
    data_here = False

    def __init__(self, workers: int, src: Path, out: Path):
        self.workers, self.src, self.out = workers, src, out

    def check(self, settings: Any) -> None:
        """The storage is PostgreSQL and the tracking URI a server (kube_tune_problem)."""
        uri = os.environ.get("KUBE_MLFLOW_TRACKING_URI") or os.environ.get(
            "MLFLOW_TRACKING_URI", ""
        )
        problem = kube_tune_problem(["--storage", settings.storage], uri)
        if problem:
            raise UserError(f"make kube-tune: {problem}. No Job was submitted.")

    def command(self, worker: int, settings_json: str) -> tuple[list[str], dict[str, str]]:
        """`mlflow run` of the Indexed Job: N pods, each with the settings."""
        config = write_rendered(
            lambda template: tune_job(template, self.workers, settings_json), self.out
        )
        experiment = json.loads(settings_json)["base"]["experiment_name"]
        argv = [mlflow_command(), "run", str(self.src), "--backend", "kubernetes"]
        argv += ["--backend-config", str(config), "-e", TUNE_ENTRY, "--build-image"]
        return [*argv, "--experiment-name", experiment], dict(os.environ)


def kube_tune_main(argv: Sequence[str], workers: int, src: Path, out: Path) -> int:
    """`make kube-tune WORKERS=N`: check, build the image of the code in src (the base
    of MLflow's --build-image), then run engine.tune with KubeWorkers.

    Args:
        argv: engine.tune's tune and train flags (the hooks module is train).
        workers: the Indexed Job's pods.
        src: a checkout of the committed code (the Makefile's worktree of HEAD).
        out: where the rendered Job template and backend config go.

    Raises:
        UserError: a study storage that is not PostgreSQL, or no tracking server;
            before anything is built or submitted.
    """
    from engine import tune  # loaded only when tuning starts: the host stays light

    uri = os.environ.get("KUBE_MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI", "")
    problem = kube_tune_problem(argv, uri)
    if problem:
        raise UserError(f"make kube-tune: {problem}. Nothing was built or submitted.")
    build_image(src, os.environ.get("BASE_IMAGE", ""))
    launcher = KubeWorkers(workers, src, out)
    return tune.main(["train", *argv, "--workers", str(workers)], launcher=launcher)


def main(argv: list[str] | None = None) -> int:
    """`python -m host.tune --workers N --src DIR --out DIR TUNE_FLAGS`: make kube-tune's
    door; a user's mistake exits 2 with one paragraph."""
    # no abbreviations: a tune flag such as --seed must not pass for --src
    parser = argparse.ArgumentParser(description="make kube-tune WORKERS=N", allow_abbrev=False)
    parser.add_argument("--workers", default="1")
    parser.add_argument("--src", type=Path, default=PROJECT_DIR)
    parser.add_argument("--out", type=Path, required=True)
    args, rest = parser.parse_known_args(argv)
    workers = check_workers(args.workers)
    try:
        return kube_tune_main(rest, workers, args.src, args.out)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
