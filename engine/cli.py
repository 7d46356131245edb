"""The training command line: flags from the Config, a run, a summary, no tracebacks."""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from engine.common import STOP_SIGNALS
from engine.config import UserError, parse_config

if TYPE_CHECKING:
    from engine.training import TrainResult


def exit_on_sigterm() -> list[int]:
    """Make SIGTERM (docker stop, kill, a job scheduler) unwind like an exception, so
    `with mlflow.start_run()` marks a run FAILED instead of leaving it RUNNING.

    train.py's main, `make tune`'s coordinator and its workers all use this one handler.

    Returns:
        the signals received so far (the handler appends to it): a SystemExit raised
        while TensorFlow's C++ was calling back into Python can come out as another
        exception, so whoever catches exceptions checks it and exits 128 + signal.
    """

    def stop(signum: int, frame: object) -> None:
        STOP_SIGNALS.append(signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    return STOP_SIGNALS


def quiet_tensorflow() -> None:
    """Import TensorFlow with its C++ start-up lines sent to /dev/null, on a machine
    without an NVIDIA GPU.

    Those lines (oneDNN, CUDA stubs, CPU instructions, a failed cuInit) are printed before
    any log level applies, twice, and read like errors on a CPU machine. A GPU machine keeps
    them (they say why a GPU was not used), and so does TF_CPP_MIN_LOG_LEVEL=0.
    """
    has_gpu = any(Path("/dev").glob("nvidia[0-9]*"))
    if "tensorflow" in sys.modules or has_gpu or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf  # the import is the point

        tf.config.list_physical_devices("GPU")  # where cuInit fails on a CPU machine
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def main(
    config_cls: type,
    load_data,
    define_network,
    argv: list[str] | None = None,
    description: str = "",
) -> int:
    """Parse flags into config_cls, train with the two functions, print what a user needs.

    Returns:
        0 on success, 2 for a problem the user can fix (its message printed, no traceback).
    """
    cfg = parse_config(config_cls, argv, description)
    # Set here, not on import: hide TensorFlow's C++ start-up chatter where it still can be.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The pipelines drop undecodable files, so their length is unknown until a first
    # pass ends, and Keras then warns that the input "ran out of data". Harmless.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    signals = exit_on_sigterm()
    quiet_tensorflow()
    # Imported once the flags are parsed and TF_CPP_MIN_LOG_LEVEL is set: it loads
    # TensorFlow and MLflow, which --help and a bad flag never need.
    from engine.tracking import TrackingLost, bound_http_retries
    from engine.training import run_training

    bound_http_retries()

    started = time.time()
    try:
        result = run_training(cfg, load_data, define_network)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrackingLost as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception:
        # A SystemExit raised while TensorFlow's C++ was calling back into Python can
        # come out as another exception; the run is FAILED either way: exit as signalled.
        if signals:
            print(f"stopped by signal {signals[0]}", file=sys.stderr)
            return 128 + signals[0]
        raise
    print_summary(result, time.time() - started)
    return 0


def print_summary(result: TrainResult, seconds: float) -> None:
    """What a user needs after a run: its id, the model version, the scores, where to look."""
    print(f"\ndone in {seconds:.0f} s")
    print(f"run_id: {result.run_id}")
    if result.model_version:
        print(
            f"registered model: {result.registered_model_name} version {result.model_version}"
            + (f" (alias {result.model_alias})" if result.model_alias else "")
        )
    print(f"best_epoch: {result.best_epoch}")
    if "val_accuracy" in result.metrics:
        print(
            f"val_accuracy: {result.metrics['val_accuracy']:.4f} (of the best epoch, "
            f"{result.best_epoch}: its weights are the model; best_val_accuracy in the UI)"
        )
    if "test_accuracy" in result.test_metrics:
        print(
            f"test_accuracy: {result.test_metrics['test_accuracy']:.4f} "
            "(the test split: no choice was made on it)"
        )
    if result.tracking_uri.startswith("sqlite:"):
        print(
            f"see it: make ui, or mlflow ui --backend-store-uri {result.tracking_uri} "
            "--port 5000, then open http://127.0.0.1:5000"
        )
    else:
        print(f"see it: {result.tracking_uri}")
