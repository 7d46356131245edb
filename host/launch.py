"""The one launcher: every `mlflow run` the host starts (make run, make sweep) goes
through it, with one retry rule.

It runs 1..N jobs, at most P at a time, each in a slot (a sweep gives each slot its own
GPU), and tries a failed run again up to R times: resumed into the same MLflow run from
its last checkpoint when that is on this host (the run's `checkpoint_dir` tag names a
folder holding engine.common.CHECKPOINT_STATE), else started over as a new run. Its
lines, each with a sweep's "[i/N] " in front:

    + mlflow run PROJECT -A ... -P ...                 before each try
    run ID failed (exit N): retry i of R               a failed try, tried again
    retry: resuming run ID from its checkpoint in FOLDER
    retry: run ID left no checkpoint here; starting it over
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from engine.common import CHECKPOINT_STATE, PROJECT_DIR
from host.plan import Plan, docker_arg_flags


@dataclass
class Job:
    """One run to launch, and what became of it."""

    params: dict[str, str] = field(default_factory=dict)  # its own -P values (a sweep point)
    run_id: str = ""  # the run it starts into: made first, or "" for `mlflow run` to make
    resume: bool = False  # continue run_id from its checkpoint (-P resume_run_id=ID)
    label: str = ""  # in front of its lines: "[2/4] " in a sweep
    status: str = ""  # FINISHED, FAILED or KILLED when it ended, or "NOT STARTED: why"
    exit_code: int = 0  # its last try's, 128+N after signal N, as a shell says it
    tries: int = 0  # retries so far


def run_argv(
    project: str, docker_args: Mapping[str, str | bool], run_args: Sequence[str], job: Job
) -> list[str]:
    """`mlflow`'s arguments for one try of a job: run, the project, the -A docker args,
    the `mlflow run` options, the job's -P values and the run it starts into."""
    params = {**job.params, **({"resume_run_id": job.run_id} if job.resume else {})}
    argv = ["run", project, *docker_arg_flags(docker_args), *run_args]
    argv += [word for name, value in params.items() for word in ("-P", f"{name}={value}")]
    return argv + (["--run-id", job.run_id] if job.run_id else [])


def mlflow_command() -> str:
    """The `mlflow` to run: $MLFLOW when set (project_driver.bash passes its own), else the
    one beside this Python (the venv's), else the first on PATH."""
    beside = Path(sys.executable).with_name("mlflow")
    if os.environ.get("MLFLOW"):
        return os.environ["MLFLOW"]
    return str(beside) if os.access(beside, os.X_OK) else "mlflow"


def start_mlflow_run(argv: Sequence[str], env: Mapping[str, str]) -> subprocess.Popen:
    """Start `mlflow ARGV` in the project folder (the project "." is this folder)."""
    return subprocess.Popen([mlflow_command(), *argv], env=dict(env), cwd=PROJECT_DIR)


def resumable_checkpoint(run_id: str) -> Path | None:
    """A failed run's checkpoint folder when it is on this host, else None.

    Training tags each run with its checkpoint folder (`checkpoint_dir`); under Docker
    it is on this host at the same path when it lies in the mounted STORAGE_DIR (the
    default /storage/checkpoints does).
    """
    from mlflow import MlflowClient  # seconds to import: only once a run has failed

    folder = MlflowClient().get_run(run_id).data.tags.get("checkpoint_dir", "")
    if folder and (Path(folder) / CHECKPOINT_STATE).is_file():
        return Path(folder)
    return None


def retry_decision(run_id: str) -> tuple[str, str]:
    """How to try a failed run again: resume it into the same run from its checkpoint,
    or, with none on this host, start it over as a new run.

    Returns:
        (the run id to resume, or "" to start over; a line saying which).
    """
    folder = resumable_checkpoint(run_id)
    if folder is None:
        return "", f"retry: run {run_id} left no checkpoint here; starting it over"
    return run_id, f"retry: resuming run {run_id} from its checkpoint in {folder}"


def exit_status(code: int) -> int:
    """A process's exit code as a shell reports it: 128+N after signal N."""
    return 128 - code if code < 0 else code


class Launcher:
    """Runs jobs through `mlflow run`, all with one plan's project, docker args, options
    and tracking URI.

    Args:
        plan: what every job shares.
        retries: how many times a failed job is tried again.
        parallel: jobs at once, each in its own slot, 0 to parallel-1.
        create_run: makes the run of a job that has none, just before it starts (a
            sweep's runs, a run started over), from the job's -P values, and returns its
            id; None leaves it to `mlflow run` (such a job cannot be retried).
        slot_docker_args: a slot's docker args over the plan's (a sweep: its own GPU).
        out: where the launcher's lines go (default: stderr).
        on_done: called with each job when it has ended for good.
        start: starts `mlflow` with argv and an environment (tests pass a fake).
        poll_seconds: how often running jobs are looked at.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        retries: int = 0,
        parallel: int = 1,
        create_run: Callable[[Mapping[str, str]], str] | None = None,
        slot_docker_args: Callable[[int], Mapping[str, str]] = lambda slot: {},
        out: TextIO | None = None,
        on_done: Callable[[Job], None] = lambda job: None,
        start: Callable[[Sequence[str], Mapping[str, str]], subprocess.Popen] = start_mlflow_run,
        poll_seconds: float = 0.5,
    ):
        self.plan, self.retries, self.parallel = plan, retries, parallel
        self.create_run, self.slot_docker_args = create_run, slot_docker_args
        self.out = out or sys.stderr
        self.on_done, self.start, self.poll_seconds = on_done, start, poll_seconds
        self.stopping = False  # after SIGTERM: no new starts, no retries

    def run(self, jobs: Sequence[Job]) -> list[Job]:
        """Launch the jobs in order, at most `parallel` at once; wait for them all.

        A job tried again goes to the front of the queue. Returns the jobs, ended.
        """
        pending, free = list(jobs), list(range(self.parallel))
        running: dict[int, tuple[Job, subprocess.Popen]] = {}  # slot -> (job, its mlflow)
        with self._forward_sigterm(running):
            try:
                while pending or running:
                    while pending and free and not self.stopping:
                        self._start(pending.pop(0), free.pop(0), running, free)
                    while pending and self.stopping:  # after SIGTERM nothing more starts
                        self._end(pending.pop(0), "NOT STARTED: stopped", 1)
                    if not self._reap(running, free, pending) and running:
                        time.sleep(self.poll_seconds)
            except KeyboardInterrupt:  # Ctrl-C reached the runs too: let them end, then stop
                for _, process in running.values():
                    process.wait()
                raise
        return list(jobs)

    def _reap(self, running: dict, free: list[int], pending: list[Job]) -> bool:
        """Take the jobs whose try ended off `running`, freeing their slots; a job to be
        tried again goes to the front of `pending`. True when any try ended."""
        ended = [
            (slot, code)
            for slot, (_, process) in running.items()
            if (code := process.poll()) is not None
        ]
        for slot, code in ended:
            job, _ = running.pop(slot)
            free.append(slot)
            if self._try_again(job, code):
                pending.insert(0, job)
        return bool(ended)

    def _say(self, job: Job, line: str) -> None:
        print(f"{job.label}{line}", file=self.out, flush=True)

    def _start(self, job: Job, slot: int, running: dict, free: list[int]) -> None:
        """Start one try of a job in a slot; a job that cannot start ends, its slot freed."""
        try:
            if not job.run_id and self.create_run is not None:
                job.run_id = self.create_run(job.params)
            docker_args = {**self.plan.docker_args, **self.slot_docker_args(slot)}
            argv = run_argv(self.plan.project, docker_args, self.plan.run_args, job)
            self._say(job, f"+ mlflow {' '.join(argv)}")
            env = {**os.environ, "MLFLOW_TRACKING_URI": self.plan.tracking_uri}
            running[slot] = (job, self.start(argv, env))
        except Exception as error:  # a launch failure fails that job, not the others
            self._end(job, f"NOT STARTED: {error}", 1)
            free.append(slot)

    def _try_again(self, job: Job, code: int) -> bool:
        """After a try ended with exit `code`: True when the job is to be tried again
        (its run resumed or started over), else the job ends."""
        if code == 0 or self.stopping or job.tries >= self.retries or not job.run_id:
            self._end(job, "FINISHED" if code == 0 else "KILLED" if code < 0 else "FAILED", code)
            return False
        job.tries += 1
        failed = f"run {job.run_id} failed (exit {exit_status(code)})"
        self._say(job, f"{failed}: retry {job.tries} of {self.retries}")
        resume, line = retry_decision(job.run_id)
        self._say(job, line)
        job.run_id, job.resume = resume, bool(resume)
        return True

    def _end(self, job: Job, status: str, code: int) -> None:
        job.status, job.exit_code = status, exit_status(code)
        self.on_done(job)

    @contextlib.contextmanager
    def _forward_sigterm(self, running: dict) -> Iterator[None]:
        """While jobs run, SIGTERM (a scheduler stopping this) is passed on to their
        `mlflow run`, which stops its container; nothing more starts."""

        def forward(signum: int, frame: object) -> None:
            self.stopping = True
            for _, process in running.values():
                process.send_signal(signum)

        try:
            previous = signal.signal(signal.SIGTERM, forward)
        except ValueError:  # not the main thread: signals are not ours to handle
            previous = None
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
