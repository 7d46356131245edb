"""One run in the image (make run, project_driver.bash).

Before anything starts: check the tracking server, check out a git version if asked,
build the image for the code that runs, decide the docker args (one line each), and
create the run first where it must have its id before `mlflow run` starts (a local
artifact folder, or retries). Then either the launcher runs it (`project_driver.py
run`, retries included), or project_driver.bash gets its `mlflow run` argv as data
(`project_driver.py plan --print0`) and runs it itself.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from engine.config import UserError
from host import workers as cluster
from host.artifacts import create_run_first, first_run_options, local_artifacts
from host.checkout import checkout_if_asked, remove_checkout, split_version_args
from host.image import build_image, code_docker_args
from host.launch import Job, Launcher, run_argv
from host.plan import Plan, host_plan, option


def retries_setting(value: str | None) -> int:
    """RETRIES, how many times a failed run is tried again: a whole number, 0 if unset."""
    value = value or "0"
    if not re.fullmatch(r"[0-9]+", value):
        raise UserError(f"RETRIES must be a whole number of retries, got '{value}'")
    return int(value)


def prepare_run(
    plan: Plan, project_dir: Path, args: Sequence[str], base_image: str, out: TextIO | None = None
) -> dict | None:
    """Build the image for the code in project_dir and plan where artifacts land.

    Returns:
        local_artifacts()'s answer: the options to create runs with, or None.
    """
    identity = build_image(project_dir, base_image, out=out)
    plan.decide(*code_docker_args(identity))
    return local_artifacts(plan, project_dir, args)


def run_creator(
    plan: Plan, project_dir: Path, options: Mapping
) -> Callable[[Mapping[str, str]], str]:
    """The launcher's create_run for this plan: create_run_first() with a job's own -P
    values over the `mlflow run` options' ones."""
    user = str(plan.docker_args.get("user", ""))

    def create_run(params: Mapping[str, str]) -> str:
        return create_run_first(project_dir, options, {**options["parameters"], **params}, user)

    return create_run


def prepare_one(
    argv: Sequence[str], retries: int, base_image: str, out: TextIO, workers: int = 1
) -> tuple[Plan, Job, Callable[[Mapping[str, str]], str] | None]:
    """Everything before one run starts; its lines go to `out`.

    Args:
        argv: `mlflow run` options, with the driver's --git-url and --version among them.
        retries: how many times the run will be tried again (> 0: it is created first).
        base_image: the image to build on ("" keeps the image's own).
        out: where the decisions and Docker's build output go.
        workers: containers that train the run together (> 1: it is created first).

    Returns:
        (the plan, the job to launch, the launcher's create_run or None).
    """
    url, version, rest = split_version_args(argv)
    plan, _ = host_plan(rest)
    plan.run_args = list(rest)
    try:
        project_dir = checkout_if_asked(plan, url, version)
        plan.say(out)
        options = prepare_run(plan, project_dir, rest, base_image, out=out)
        if options is None and (retries > 0 or workers > 1) and not option(rest, "--run-id"):
            options = first_run_options(plan, project_dir, rest)
        create_run = run_creator(plan, project_dir, options) if options else None
        job = Job(run_id=create_run({}) if create_run else "")
        plan.say(out)
    except BaseException:
        remove_checkout(plan)
        raise
    return plan, job, create_run


def plan_data(plan: Plan, job: Job) -> str:
    """A prepared run as project_driver.bash reads it (`mapfile -d ''`): NUL-terminated
    fields, the tracking URI, the checkout folder to remove when the run ends ("" when
    none), then the arguments of `mlflow` (run PROJECT -A ... options)."""
    mlflow_argv = run_argv(plan.project, plan.docker_args, plan.run_args, job)
    return "".join(f"{field}\0" for field in [plan.tracking_uri, plan.cleanup, *mlflow_argv])


def plan_main(argv: Sequence[str], print0: bool, base_image: str) -> int:
    """`project_driver.py plan`: prepare one run and print its `mlflow` command on stdout,
    as plan_data() with print0, else as a shell line to read or copy (a checkout of a
    version then stays). The decisions go to stderr."""
    plan, job, _ = prepare_one(argv, 0, base_image, sys.stderr)
    if print0:
        sys.stdout.write(plan_data(plan, job))
        return 0
    mlflow_argv = run_argv(plan.project, plan.docker_args, plan.run_args, job)
    print(shlex.join([f"MLFLOW_TRACKING_URI={plan.tracking_uri}", "mlflow", *mlflow_argv]))
    return 0


def run_main(argv: Sequence[str], retries: int, base_image: str) -> int:
    """`make run`, `project_driver.py run`: prepare one run and launch it, retried up to
    `retries` times; everything the driver says goes to stderr.

    Returns:
        The exit status of the run's last try (0 when it finished).
    """
    workers = cluster.workers_setting(os.environ.get("WORKERS"))
    if workers > 1 and retries:
        raise UserError("WORKERS > 1 runs are not retried one container at a time: set RETRIES=0")
    plan, job, create_run = prepare_one(argv, retries, base_image, sys.stderr, workers)
    try:
        if workers > 1:
            job = launch_workers(plan, job, workers)
        else:
            Launcher(plan, retries=retries, create_run=create_run).run([job])
    finally:
        remove_checkout(plan)
    if job.status.startswith("NOT STARTED"):
        raise UserError(f"the run could not start: {job.status.split(': ', 1)[-1]}")
    return job.exit_code


def launch_workers(plan: Plan, job: Job, workers: int, **launcher_args) -> Job:
    """Start `workers` containers into job's run at once (host.workers); once all have
    ended, the run's status is the chief's outcome. Returns the chief's job.

    Args:
        launcher_args: more Launcher arguments (tests pass a fake `start`).
    """
    network = os.environ.get("DOCKER_WORKER_NETWORK", cluster.NETWORK)
    per_worker = cluster.worker_docker_args(plan, job.run_id, workers, network)
    if plan.docker_args.get("network") != "host":
        cluster.ensure_network(network)
    jobs = cluster.worker_jobs(job.run_id, workers)
    slot_args = cluster.slot_args(per_worker)
    Launcher(plan, parallel=workers, slot_docker_args=slot_args, **launcher_args).run(jobs)
    chief = cluster.outcome(jobs)
    if job.run_id and not chief.status.startswith("NOT STARTED"):
        out = launcher_args.get("out") or sys.stderr
        cluster.settle_status(plan.tracking_uri, job.run_id, chief, out)
    return chief
