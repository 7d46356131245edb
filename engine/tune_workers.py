"""make tune's workers: each loops ask -> train -> tell until the study holds enough trials.

A worker is `python -m engine.tune worker - N` with the study's settings (JSON) in the
TUNE_SETTINGS variable; LocalWorkers starts it as a process on this machine,
project_driver.py's DockerWorkers as a container. Each trial is one run_training run,
an MLflow child run, with a Keras callback that reports the tuned metric every epoch
and stops the training when the pruner says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from engine import search_space
from engine.common import PROJECT_DIR
from engine.tune import SETTINGS_ENV, TuneSettings, load_hooks, make_study


def pruning_callback(trial, metric: str):
    """A Keras callback that reports `metric` to the trial each epoch and stops the
    training when the pruner says so, tagging the run tune.pruned / tune.pruned_epoch."""
    import keras
    import mlflow

    class OptunaPruning(keras.callbacks.Callback):
        pruned_epoch = 0

        def on_train_begin(self, logs=None):
            # known before any epoch, so a trial whose worker dies can fail its run
            trial.set_user_attr("mlflow_run_id", mlflow.active_run().info.run_id)
            mlflow.set_tag("tune.pruned", "false")

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(metric)
            if value is None:
                return
            trial.report(float(value), epoch)
            if trial.should_prune():
                self.pruned_epoch = epoch + 1
                mlflow.set_tags({"tune.pruned": "true", "tune.pruned_epoch": str(epoch + 1)})
                print(f"trial {trial.number} pruned after epoch {epoch + 1} "
                      f"({metric} {value:.4f})")  # fmt: skip
                self.model.stop_training = True

    return OptunaPruning()


def run_trial(trial, settings: TuneSettings, hooks) -> tuple[float, int]:
    """Train one trial as a child run; returns (its best metric value, pruned epoch or 0)."""
    from engine.training import run_training

    config_cls, load_data, define_network = hooks
    space = [search_space.Param(**p) for p in settings.space]
    params = {p.name: p.suggest(trial) for p in space}
    print(f"trial {trial.number}: {params}")
    cfg = config_cls(**{
        **settings.base, **params,
        "registered_model_name": "",  # only the best trial's model is registered, at the end
        "run_name": f"{settings.study_name}-{trial.number}",
    })  # fmt: skip
    pruning = pruning_callback(trial, settings.metric)
    tags = {"mlflow.parentRunId": settings.parent_run_id, "tune.study": settings.study_name,
            "tune.trial": str(trial.number)}  # fmt: skip
    result = run_training(cfg, load_data, define_network, callbacks=[pruning], tags=tags)
    trial.set_user_attr("model_uri", result.model_uri)
    return float(result.metrics[settings.metric]), pruning.pruned_epoch


def worker_main(settings_file: str, worker: int) -> int:
    """One long-lived worker: take the next trial as soon as the last one ends."""
    from optuna.trial import TrialState

    # SIGTERM (docker stop, the coordinator's Ctrl-C) unwinds: the trial and run fail
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    text = os.environ[SETTINGS_ENV] if settings_file == "-" else Path(settings_file).read_text()
    settings = TuneSettings(**json.loads(text))
    hooks = load_hooks(settings.hooks)
    study = make_study(settings, worker)
    done = 0
    # queued (WAITING) trials are not counted: asking for one starts it
    started = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    while len(study.get_trials(deepcopy=False, states=started)) < settings.stop_at:
        if settings.deadline and time.time() > settings.deadline:
            print("--timeout reached: no more trials")
            break
        trial = study.ask()
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            value, pruned_epoch = run_trial(trial, settings, hooks)
        except Exception as err:  # a trial's failure is the trial's, not the study's
            print(f"trial {trial.number} failed: {type(err).__name__}: {err}")
            study.tell(trial, state=TrialState.FAIL)
            continue
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        if pruned_epoch:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)
            print(f"trial {trial.number} finished: {settings.metric} {value:.4f}")
        done += 1
    print(f"worker {worker} done after {done} trial(s)")
    return 0


def gpu_count() -> int:
    """GPUs nvidia-smi lists (0 without a GPU or driver)."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())


class LocalWorkers:
    """Workers as processes on this machine, each on its own GPU when there are any.

    project_driver.py's DockerWorkers has the same two methods and runs each worker
    as a container instead.
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


def start_workers(launcher, settings: TuneSettings, workers: int) -> list[subprocess.Popen]:
    """Start K workers with the launcher, their output relayed with a [worker N] prefix."""
    settings_json = json.dumps(dataclasses.asdict(settings))
    processes = []
    for worker in range(workers):
        command, env = launcher.command(worker, settings_json)
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

        def relay(stream=process.stdout, prefix=f"[worker {worker}] "):
            for line in stream:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()

        threading.Thread(target=relay, daemon=True).start()
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
