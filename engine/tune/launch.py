"""Starting a study's workers and waiting for them: local processes by default, or any
Launcher (the host's DockerWorkers runs each as a container)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from engine.common import PROJECT_DIR
from engine.tune.settings import SETTINGS_ENV, Launcher, TuneSettings


def gpu_count() -> int:
    """GPUs nvidia-smi lists (0 without a GPU or driver)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


class LocalWorkers:
    """Workers as processes on this machine, each on its own GPU when there are any.

    A Launcher (engine.tune.settings); the host's DockerWorkers has the same two
    methods and runs each worker as a container instead.
    """

    def __init__(self, hooks_dir: Path):
        self.gpus = gpu_count()
        self.pythonpath = os.pathsep.join(dict.fromkeys([str(hooks_dir), str(PROJECT_DIR)]))

    def check(self, settings: TuneSettings) -> None:
        """Raise UserError when these workers could not run the study (nothing to check)."""

    def command(self, worker: int, settings_json: str) -> tuple[list[str], dict[str, str]]:
        """(the worker's command line, its environment)."""
        env = {**os.environ, "PYTHONPATH": self.pythonpath, SETTINGS_ENV: settings_json}
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(worker % self.gpus)
        return [sys.executable, "-m", "engine.tune", "worker", "-", str(worker)], env


def relay(stream: IO[str], prefix: str) -> None:
    """Copy a worker's output lines to ours, each with its prefix, until it closes."""
    for line in stream:
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def start_workers(
    launcher: Launcher, settings: TuneSettings, workers: int
) -> list[subprocess.Popen]:
    """Start K workers with the launcher, their output relayed with a [worker N] prefix.
    A launcher whose `processes` is 1 starts them all in one (make kube-tune's Job)."""
    settings_json = json.dumps(dataclasses.asdict(settings))
    processes = []
    for worker in range(min(workers, getattr(launcher, "processes", workers))):
        command, env = launcher.command(worker, settings_json)
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )
        prefix = f"[worker {worker}] "
        threading.Thread(target=relay, args=(process.stdout, prefix), daemon=True).start()
        processes.append(process)
    return processes


def wait_for(processes: list[subprocess.Popen]) -> int:
    """Wait for the workers; on Ctrl-C or SIGTERM stop them (their trials fail) and re-raise."""
    try:
        return max(process.wait() for process in processes)
    except BaseException:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        raise
