"""One worker of a study: it loops ask -> train -> tell until the study holds enough trials.

A worker is `python -m engine.tune worker - N` with the study's settings (JSON) in the
TUNE_SETTINGS variable; LocalWorkers starts it as a process on this machine, the host's
DockerWorkers as a container. Each trial is one run_training run, an MLflow child run,
with a Keras callback that reports the tuned metric every epoch and stops the training
when the pruner says so.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import keras
import mlflow
import optuna
from optuna.trial import TrialState

from engine.cli import exit_on_sigterm
from engine.training import run_training
from engine.tune.settings import SETTINGS_ENV, TuneSettings, load_hooks
from engine.tune.space import Param
from engine.tune.study import make_study

# Trials a worker has begun; queued (WAITING) trials are not counted: asking for one
# starts it.
STARTED = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class OptunaPruning(keras.callbacks.Callback):
    """Reports `metric` to the trial each epoch and stops the training when the pruner
    says so, tagging the run tune.pruned / tune.pruned_epoch."""

    def __init__(self, trial: optuna.Trial, metric: str):
        super().__init__()
        self.trial, self.metric = trial, metric
        self.pruned_epoch = 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        # known before any epoch, so a trial whose worker dies can fail its run
        self.trial.set_user_attr("mlflow_run_id", mlflow.active_run().info.run_id)
        mlflow.set_tag("tune.pruned", "false")

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.metric)
        if value is None:
            return
        self.trial.report(float(value), epoch)
        if self.trial.should_prune():
            self.pruned_epoch = epoch + 1
            mlflow.set_tags({"tune.pruned": "true", "tune.pruned_epoch": str(epoch + 1)})
            print(
                f"trial {self.trial.number} pruned after epoch {epoch + 1} "
                f"({self.metric} {value:.4f})"
            )
            self.model.stop_training = True


def run_trial(trial: optuna.Trial, settings: TuneSettings, hooks: tuple) -> tuple[float, int]:
    """Train one trial as a child run; returns (its best metric value, pruned epoch or 0)."""
    config_cls, load_data, define_network = hooks
    space = [Param(**param) for param in settings.space]
    params = {param.name: param.suggest(trial) for param in space}
    print(f"trial {trial.number}: {params}")
    values = {**settings.base, **params}
    values["registered_model_name"] = ""  # only the best trial's model is registered, at the end
    values["run_name"] = f"{settings.study_name}-{trial.number}"
    cfg = config_cls(**values)
    pruning = OptunaPruning(trial, settings.metric)
    tags = {
        "mlflow.parentRunId": settings.parent_run_id,
        "tune.study": settings.study_name,
        "tune.trial": str(trial.number),
    }
    result = run_training(cfg, load_data, define_network, callbacks=[pruning], tags=tags)
    trial.set_user_attr("model_uri", result.model_uri)
    return float(result.metrics[settings.metric]), pruning.pruned_epoch


def adopt_job_run(parent_run_id: str) -> None:
    """A worker started under a run of its own (MLFLOW_RUN_ID: the run MLflow's
    Kubernetes backend made for make kube-tune's Job) files that run under the study's
    parent run, and trains its trials as new runs, not into that one."""
    job_run_id = os.environ.pop("MLFLOW_RUN_ID", "")
    if job_run_id and parent_run_id and job_run_id != parent_run_id:
        tags = {"mlflow.parentRunId": parent_run_id, "tune.role": "workers"}
        for key, value in tags.items():
            mlflow.MlflowClient().set_tag(job_run_id, key, value)


def worker_main(settings_file: str, worker: int) -> int:
    """One long-lived worker: take the next trial as soon as the last one ends.

    Args:
        settings_file: a TuneSettings JSON file, or "-" to read it from SETTINGS_ENV.
        worker: this worker's number (its sampler's seed is the study's seed + worker).

    Returns:
        0 when the study holds enough trials or the time is up; 128 + signal when
        SIGTERM stopped a trial (the trial and its run fail).
    """
    # SIGTERM (docker stop, the coordinator's Ctrl-C) unwinds: the trial and run fail
    signals = exit_on_sigterm()
    text = os.environ[SETTINGS_ENV] if settings_file == "-" else Path(settings_file).read_text()
    settings = TuneSettings(**json.loads(text))
    hooks = load_hooks(settings.hooks)
    adopt_job_run(settings.parent_run_id)
    study = make_study(settings, worker)
    done = 0
    while len(study.get_trials(deepcopy=False, states=STARTED)) < settings.stop_at:
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
            if signals:  # SIGTERM's SystemExit, turned into another exception by TensorFlow
                print(f"stopped by signal {signals[0]}", file=sys.stderr)
                return 128 + signals[0]
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
