"""The best epoch, and per-epoch checkpoints that a crashed run resumes from.

A run's checkpoint folder (<checkpoint_dir>/<run_id>/) holds, after every epoch:
    latest.weights.h5   the model and optimizer state at the end of the last epoch
    best.weights.h5     the model at the best epoch so far (by the monitored metric)
    state.json          the last epoch, the best epoch and value, every epoch's
                        metrics, and the run's config
Each file is written to a temporary name and renamed, so a crash mid-write leaves
the previous epoch's files whole. The folder is removed when the run finishes,
unless keep_checkpoints is set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras

from engine.common import CHECKPOINT_STATE, STOP_SIGNALS, storage_folder
from engine.config import MONITORS, UserError

STATE_FILE = CHECKPOINT_STATE
LATEST_WEIGHTS = "latest.weights.h5"
BEST_WEIGHTS = "best.weights.h5"


def checkpoint_root(configured: str) -> Path:
    """The folder that holds one checkpoint sub-folder per run."""
    if configured:
        return Path(configured).expanduser()
    return storage_folder("checkpoints", "checkpoints")


@dataclass
class TrainingState:
    """What a resumed run needs besides the weights."""

    epoch: int = -1  # the last completed epoch, 0-based
    best_epoch: int = -1
    best_value: float | None = None
    epochs_since_best: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        _atomic_write(folder / STATE_FILE, lambda tmp: tmp.write_text(json.dumps(asdict(self))))

    @classmethod
    def load(cls, folder: Path) -> TrainingState:
        return cls(**json.loads((folder / STATE_FILE).read_text()))


def _atomic_write(target: Path, write) -> None:
    # Keras wants the .weights.h5 ending, so the temporary name keeps it.
    tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
    write(tmp)
    os.replace(tmp, target)


def save_weights(model: keras.Model, target: Path) -> None:
    """The model's weights and its optimizer's state, written atomically."""
    _atomic_write(target, lambda tmp: model.save_weights(tmp))


def restore_weights(model: keras.Model, source: Path) -> None:
    """Load weights and optimizer state saved by save_weights into a compiled model."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(source)


def is_better(value: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return not math.isnan(value)
    return value < best if MONITORS[monitor] == "min" else value > best


class BestEpoch(keras.callbacks.Callback):
    """Keep the best epoch's weights by `monitor`; stop early after `patience` epochs.

    At the end of training the model holds the best epoch's weights, not the last's.
    """

    def __init__(self, monitor: str, patience: int, state: TrainingState):
        super().__init__()
        self.monitor, self.patience, self.state = monitor, patience, state
        self.best_weights: list | None = None
        self.improved = False  # whether the epoch that just ended is the new best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise UserError(
                f"monitor '{self.monitor}' is not among the epoch's metrics "
                f"({', '.join(sorted(logs or {}))}); choose one of those with --monitor"
            )
        self.improved = is_better(float(value), self.state.best_value, self.monitor)
        if self.improved:
            self.state.best_value, self.state.best_epoch = float(value), epoch
            self.state.epochs_since_best = 0
            self.best_weights = self.model.get_weights()
        else:
            self.state.epochs_since_best += 1
        if self.patience and self.state.epochs_since_best >= self.patience:
            print(f"stopping early: {self.monitor} has not improved for {self.patience} epoch(s)")
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)


class Checkpointer(keras.callbacks.Callback):
    """After every epoch: the latest weights, the best ones when they changed, the state.

    Put it after BestEpoch in the callback list, and before anything that logs the
    epoch elsewhere, so a checkpoint never lags behind what was logged.
    """

    def __init__(self, folder: Path, state: TrainingState, best: BestEpoch):
        super().__init__()
        self.folder, self.state, self.best = folder, state, best

    def on_epoch_end(self, epoch, logs=None):
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, value in (logs or {}).items():
            self.state.history.setdefault(name, []).append(float(value))
        self.state.epoch = epoch
        save_weights(self.model, self.folder / LATEST_WEIGHTS)
        if self.best.improved:
            save_weights(self.model, self.folder / BEST_WEIGHTS)
        self.state.save(self.folder)


def resume(model: keras.Model, folder: Path, best: BestEpoch) -> None:
    """Put the checkpointed weights back: the best epoch's into `best`, the latest into model."""
    if (folder / BEST_WEIGHTS).exists():
        restore_weights(model, folder / BEST_WEIGHTS)
        best.best_weights = model.get_weights()
    restore_weights(model, folder / LATEST_WEIGHTS)


def find_checkpoint(root: Path, run_id: str) -> Path:
    """The checkpoint folder of a run; UserError saying where it looked when there is none."""
    folder = root / run_id
    if not (folder / STATE_FILE).exists() or not (folder / LATEST_WEIGHTS).exists():
        raise UserError(
            f"no checkpoint of run {run_id} in {root}: a run leaves one after each finished "
            "epoch. Give the folder it used with --checkpoint-dir, or start a new run "
            "without --resume-run-id."
        )
    return folder


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


class StopOnSignal(keras.callbacks.Callback):
    """Stop training after a batch when a stop signal arrived whose SystemExit was lost
    (see engine.common.STOP_SIGNALS): the run then ends FAILED with its resume command,
    as when the SystemExit came through."""

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if STOP_SIGNALS:
            raise SystemExit(128 + STOP_SIGNALS[0])
