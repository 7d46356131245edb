"""run_training(cfg, load_data, define_network): from data to a registered model.

Everything that can be checked is checked before an MLflow run exists: the
config, the tracking server, the data (load_data's contract), the network
(define_network's contract) and the monitored metric. Every epoch is checkpointed,
so a crashed run resumes into the same MLflow run (--resume-run-id). The model
logged and registered is the best epoch's by cfg.monitor, and only after training
and evaluation succeed, so a failed run never gets a model version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from engine import checkpoints, evaluation, provenance, tracking
from engine.config import RunConfig, UserError
from engine.images import DataInfo
from engine.network import build_network, class_probabilities, encode_labels, weigh_classes

LoadData = Callable[[Any], tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]]
DefineNetwork = Callable[[tuple[int, int, int], int, Any], keras.Model]

DATA_CONTRACT = (
    "load_data(cfg) must return (train_ds, val_ds, info): two batched tf.data.Datasets of "
    "(images (batch, H, W, C) float32 or uint8 pixel values 0..255, labels (batch,) integer "
    "class indices) and an engine.images.DataInfo (its test_ds, optional, batched alike); "
    "the engine's files_pipeline and arrays_pipeline build all of them."
)


@dataclass
class TrainResult:
    run_id: str
    model_uri: str  # the logged model (models:/m-...), what MLflow loads
    model_version: str | None  # registered version, None when not registered
    metrics: dict[str, float]  # the best epoch's metrics
    tracking_uri: str
    best_epoch: int  # 0-based, as the metrics' steps
    test_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # test_* once


def gpu_devices() -> list[str]:
    """The names of the GPUs TensorFlow sees, e.g. ["/device:GPU:0"]."""
    return [device.name for device in tf.config.list_logical_devices("GPU")]


def choose_strategy(cfg: RunConfig) -> tf.distribute.Strategy:
    """MirroredStrategy over all GPUs when there are several, OneDeviceStrategy on one.

    Both copy the next batches to the GPU(s) while the current one trains: the
    prefetch to the device that keeps a GPU fed (under the default strategy each batch
    is copied only when its step asks for it). Without a GPU, the default strategy.
    """
    gpus = gpu_devices()
    if cfg.distribute and len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if gpus:
        return tf.distribute.OneDeviceStrategy(gpus[0])
    return tf.distribute.get_strategy()


def compute_dtype(setting: str, capabilities: list[tuple[int, int]]) -> str:
    """float32, bfloat16 or float16 for a mixed_precision setting and the GPUs' compute
    capabilities (an empty list on the CPU).

    auto (or true) picks bfloat16 on compute capability 8.0 and newer (Ampere, Hopper:
    no loss scaling needed), float16 on older GPUs, float32 on the CPU.
    """
    if setting in ("float32", "false"):
        return "float32"
    if not capabilities:
        if setting != "auto":
            print(f"note: {setting} compute needs a GPU; training in float32")
        return "float32"
    if setting in ("bfloat16", "float16"):
        return setting
    return "bfloat16" if min(capabilities) >= (8, 0) else "float16"


def set_precision(cfg: RunConfig) -> str:
    """Set Keras' global dtype policy from cfg.mixed_precision; return the policy's name.

    Under mixed_float16 Keras wraps the optimizer in a LossScaleOptimizer at compile time.
    """
    capabilities = [
        tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0))
        for gpu in tf.config.list_physical_devices("GPU")
    ]
    dtype = compute_dtype(cfg.mixed_precision, capabilities)
    policy = "float32" if dtype == "float32" else f"mixed_{dtype}"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def check_data(result: Any) -> tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]:
    """load_data's return value, checked against its contract before any run starts."""
    if not (isinstance(result, tuple) and len(result) == 3):
        raise UserError(f"load_data returned {type(result).__name__}. {DATA_CONTRACT}")
    train_ds, val_ds, info = result
    if not isinstance(info, DataInfo):
        raise UserError(f"load_data's third value is {type(info).__name__}. {DATA_CONTRACT}")
    if info.num_classes < 2:
        raise UserError(f"the data has {info.num_classes} class(es); a classifier needs two")
    named = [("train_ds", train_ds), ("val_ds", val_ds)]
    if info.test_ds is not None:
        named.append(("info.test_ds", info.test_ds))
    for name, ds in named:
        if not isinstance(ds, tf.data.Dataset):
            raise UserError(f"load_data's {name} is {type(ds).__name__}. {DATA_CONTRACT}")
        spec = ds.element_spec
        if not (isinstance(spec, tuple) and len(spec) == 2):
            raise UserError(f"{name} yields {spec}, not (images, labels). {DATA_CONTRACT}")
        images, labels = spec
        shape = tuple(images.shape)
        if len(shape) != 4 or (None not in shape[1:] and shape[1:] != tuple(info.image_shape)):
            raise UserError(
                f"{name} yields images of shape {shape}; expected (batch, "
                f"{', '.join(map(str, info.image_shape))}) as info.image_shape says. "
                + DATA_CONTRACT
            )
        if not (images.dtype.is_floating or images.dtype == tf.uint8):
            raise UserError(f"{name} yields {images.dtype.name} images. {DATA_CONTRACT}")
        if not labels.dtype.is_integer or labels.shape.rank != 1:
            raise UserError(
                f"{name} yields labels of {labels.dtype.name} {tuple(labels.shape)}; expected "
                f"integer class indices of shape (batch,). {DATA_CONTRACT}"
            )
    return train_ds, val_ds, info


class EpochTimer(keras.callbacks.Callback):
    """Add epoch_seconds and images_per_second (training images / wall time) to each epoch."""

    def __init__(self, train_count: int):
        super().__init__()
        self.train_count, self.started = train_count, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        seconds = time.perf_counter() - self.started
        if logs is not None:
            logs["epoch_seconds"] = seconds
            logs["images_per_second"] = self.train_count / max(seconds, 1e-9)


def check_monitor(model: keras.Model, val_ds: tf.data.Dataset, head, info, monitor: str) -> None:
    """The monitored metric must be one the compiled model reports; checked on one batch."""
    names = model.evaluate(
        encode_labels(val_ds.take(1), head, info.num_classes), verbose=0, return_dict=True
    )
    if monitor.removeprefix("val_") not in names:
        raise UserError(
            f"monitor '{monitor}' is not reported by the compiled model, whose metrics are "
            f"{', '.join('val_' + n for n in sorted(names))}; set --monitor to one of those, "
            "or compile the model with that metric"
        )


def resumed_config(cfg: RunConfig, state: checkpoints.TrainingState) -> RunConfig:
    """The crashed run's own config; only where checkpoints go and whether they stay is new."""
    names = {f.name for f in dataclasses.fields(cfg)}
    saved = {k: v for k, v in state.config.items() if k in names}
    keep = ("resume_run_id", "checkpoint_dir", "keep_checkpoints")
    return dataclasses.replace(cfg, **{**saved, **{k: getattr(cfg, k) for k in keep}})


def open_resumed_run(run_id: str):
    """The crashed run, checked to exist and not to have finished."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as err:
        raise UserError(f"run {run_id} is not in {mlflow.get_tracking_uri()}: {err}") from err
    if run.info.status == "FINISHED":
        raise UserError(f"run {run_id} has finished; there is nothing to resume")
    return run


def log_missing_epochs(run_id: str, state: checkpoints.TrainingState) -> int:
    """Log the checkpointed epochs' metrics that the run lacks (a crash between the
    checkpoint and the log); returns how many epochs needed it."""
    import mlflow

    client = mlflow.MlflowClient()
    missing: dict[int, dict[str, float]] = {}
    for name, values in state.history.items():
        logged = {m.step for m in client.get_metric_history(run_id, name)}
        for step, value in enumerate(values):
            if step not in logged:
                missing.setdefault(step, {})[name] = value
    for step, metrics in sorted(missing.items()):
        mlflow.log_metrics(metrics, step=step)
    return len(missing)


def say_how_to_resume(run_id: str, cfg: RunConfig) -> None:
    """Tag the stopped run as resumable and print the command that resumes it."""
    import mlflow

    command = f"python train.py --resume-run-id {run_id}"
    if cfg.checkpoint_dir:
        command += f" --checkpoint-dir {cfg.checkpoint_dir}"
    with contextlib.suppress(Exception):  # the server may be what failed
        mlflow.set_tag("resume_command", command)
    print(f"\nrun {run_id} stopped after a checkpoint; resume it with:\n  {command}",
          file=sys.stderr)  # fmt: skip


def run_training(
    cfg: RunConfig,
    load_data: LoadData,
    define_network: DefineNetwork,
    callbacks: list[keras.callbacks.Callback] | None = None,
    tags: dict[str, str] | None = None,
) -> TrainResult:
    """Check everything, train, evaluate and log one run; register its best epoch's model.

    With cfg.resume_run_id, reopen that crashed run and go on from its last checkpoint,
    with its own config.

    Args:
        cfg: the run's Config (a RunConfig subclass, so the engine's knobs are there).
        load_data: cfg -> (train_ds, val_ds, info), see DATA_CONTRACT.
        define_network: (input_shape, num_classes, cfg) -> keras.Model, see engine.network.
        callbacks: more Keras callbacks, called after an epoch is checkpointed and logged
            (a tuner's pruning callback sets model.stop_training).
        tags: more tags for the run (e.g. mlflow.parentRunId for a tuning trial).

    Raises:
        UserError: a bad parameter, data, network or tracking server, before any run.
    """
    import mlflow

    cfg.validate()
    tracking_uri = tracking.configure_tracking()
    root = checkpoints.checkpoint_root(cfg.checkpoint_dir)
    state = checkpoints.TrainingState(config=dataclasses.asdict(cfg))
    if cfg.resume_run_id:
        checkpoints.find_checkpoint(root, cfg.resume_run_id)
        open_resumed_run(cfg.resume_run_id)
        state = checkpoints.TrainingState.load(root / cfg.resume_run_id)
        cfg = resumed_config(cfg, state)
        print(f"resuming run {cfg.resume_run_id} after epoch {state.epoch + 1} of {cfg.epochs} "
              "with its own config")  # fmt: skip
    keras.utils.set_random_seed(cfg.seed)
    strategy = choose_strategy(cfg)
    replicas = strategy.num_replicas_in_sync
    policy = set_precision(cfg)

    print("loading data ...")
    global_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * replicas)
    train_ds, val_ds, info = check_data(load_data(global_cfg))
    print(f"  {info.train_count} training / {info.val_count} validation / {info.test_count} "
          f"test images, classes {info.class_names}, shape {info.image_shape}")  # fmt: skip
    warn_imbalance(info)

    print("building the network ...")
    steps_per_epoch = math.ceil(info.train_count / global_cfg.batch_size)
    with strategy.scope():
        model, head = build_network(
            define_network, info.image_shape, info.num_classes, cfg, steps_per_epoch
        )
    outputs = "one sigmoid output" if head.binary else f"{head.units} softmax outputs"
    print(f"  {model.name}: {model.count_params():,} parameters, {outputs}, {policy}")
    check_monitor(model, val_ds, head, info, cfg.monitor)
    weights = class_weights(cfg.class_weight, info)
    if head.binary and not cfg.resume_run_id:
        init_output_bias(model, info)

    best = checkpoints.BestEpoch(cfg.monitor, cfg.early_stopping_patience, state)
    if cfg.resume_run_id:
        if os.environ.get("MLFLOW_RUN_ID", cfg.resume_run_id) != cfg.resume_run_id:
            # `mlflow run -P resume_run_id=...` made a run of its own: say where it went
            mlflow.MlflowClient().set_tag(
                os.environ["MLFLOW_RUN_ID"], "resumed_run_id", cfg.resume_run_id
            )
        os.environ.pop("MLFLOW_RUN_ID", None)
        run_context = mlflow.start_run(
            run_id=cfg.resume_run_id, log_system_metrics=cfg.system_metrics
        )
    else:
        tracking.set_experiment(cfg.experiment_name, tracking_uri)
        source = info.source or "data"
        run_context = mlflow.start_run(
            run_name=cfg.run_name or f"{model.name}-{source}",
            log_system_metrics=cfg.system_metrics,
        )
    with run_context as run:
        run_id = run.info.run_id
        folder = root / run_id
        print(f"logging to {tracking_uri}, run {run_id}")
        code = provenance.check_and_tag(run_id, tracking.PROJECT_DIR)  # stops a stale image
        mlflow.set_tags({
            "git_commit": code["commit"], "data_source": info.source or "data",
            "network": model.name, "checkpoint_dir": str(folder),
            # `lifecycle.py reap-runs` marks the run FAILED once this process is gone
            "process.host": socket.gethostname(), "process.pid": str(os.getpid()),
            **(tags or {}),
        })  # fmt: skip
        tracking.log_new_params(run_id, dataclasses.asdict(cfg))
        tracking.log_new_params(run_id, {
            "num_classes": info.num_classes, "class_names": ",".join(info.class_names),
            "train_count": info.train_count, "val_count": info.val_count,
            "test_count": info.test_count,
            **{f"class_counts.{split}": describe_counts(counts, info.class_names)
               for split, counts in info.class_counts.items()},
            "skipped_files": len(info.skipped_files), "replicas": replicas,
            "distribute_strategy": type(strategy).__name__,
            "global_batch_size": global_cfg.batch_size, "dtype_policy": policy,
            "output_units": head.units,
        })  # fmt: skip
        lines: list[str] = []
        model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
        mlflow.log_text("\n".join(lines), "model_summary.txt")
        if not cfg.resume_run_id:
            tracking.log_dataset(info.lineage)

        initial_epoch = 0
        if cfg.resume_run_id:
            checkpoints.resume(model, folder, best)
            initial_epoch = state.epoch + 1
            if log_missing_epochs(run_id, state):
                print("  logged the metrics of a checkpointed epoch the crash had not sent")

        print(f"training for {cfg.epochs - initial_epoch} epoch(s), "
              f"the best by {cfg.monitor} is kept ...")  # fmt: skip
        metrics_logger = tracking.MlflowMetrics()
        # order matters: time the epoch, pick the best, checkpoint, then log
        all_callbacks = [EpochTimer(info.train_count), best,
                         checkpoints.Checkpointer(folder, state, best), metrics_logger,
                         *(callbacks or [])]  # fmt: skip
        try:
            model.fit(
                encode_labels(weigh_classes(train_ds, weights), head, info.num_classes),
                validation_data=encode_labels(
                    weigh_classes(val_ds, weights), head, info.num_classes
                ),
                epochs=cfg.epochs,
                initial_epoch=initial_epoch,
                callbacks=all_callbacks,
                shuffle=False,  # train_ds reshuffles itself every epoch
                verbose="auto" if sys.stdout.isatty() else 2,
            )
        except BaseException:  # SIGTERM arrives as SystemExit, Ctrl-C as KeyboardInterrupt
            if state.epoch >= 0:
                say_how_to_resume(run_id, cfg)
            raise
        metrics_logger.flush()
        best_metrics = {k: v[state.best_epoch] for k, v in state.history.items()}
        mlflow.log_metric("best_epoch", state.best_epoch)
        mlflow.log_metrics({f"best_{k}": v for k, v in best_metrics.items()
                            if k.startswith("val_")})  # fmt: skip
        print(f"best epoch: {state.best_epoch + 1} of {state.epoch + 1} "
              f"({cfg.monitor} {state.best_value:.4f}); its weights are logged")  # fmt: skip

        print("evaluating and logging plots and the model ...")
        log_evaluation(model, val_ds, info, state.history)
        test_metrics = log_test(model, info)
        example = next(iter(val_ds))[0].numpy()[:1].astype(np.float32)
        model_uri, model_version = tracking.log_model(
            model, example, info.class_names, cfg.registered_model_name, cfg.model_alias,
            cfg.export_savedmodel,
        )  # fmt: skip
    if not cfg.keep_checkpoints:
        checkpoints.remove(folder)

    return TrainResult(
        run_id=run_id,
        model_uri=model_uri,
        model_version=model_version,
        metrics=best_metrics,
        tracking_uri=tracking_uri,
        best_epoch=state.best_epoch,
        test_metrics=test_metrics,
    )


def warn_imbalance(info: DataInfo) -> None:
    """Print a warning when the smallest class has under 10% of the largest's images."""
    counts = info.class_counts.get("train")
    if counts and min(counts) < 0.1 * max(counts):
        small = info.class_names[int(np.argmin(counts))]
        print(f"warning: imbalanced classes: {small} has {min(counts)} training images, "
              f"under 10% of the largest class's {max(counts)}. Accuracy says little here: "
              "watch balanced_accuracy and per-class recall, and consider "
              "--class-weight balanced")  # fmt: skip


def class_weights(setting: str, info: DataInfo) -> dict[int, float] | None:
    """balanced: total / (classes x class count), from the training split; none: None.

    The weights apply to the training and the validation loss (network.weigh_classes),
    so the best epoch by val_loss is picked by the loss that was minimised.
    """
    counts = np.asarray(info.class_counts.get("train") or [], dtype=np.float64)
    if setting != "balanced":
        return None
    if not len(counts) or (counts == 0).any():
        raise UserError(
            "class_weight=balanced needs the training images per class (DataInfo.class_counts"
            "['train'], which files_pipeline and arrays_pipeline fill in), each above zero"
        )
    weights = counts.sum() / (len(counts) * counts)
    print("  class weights: " + ", ".join(
        f"{n} {w:.2f}" for n, w in zip(info.class_names, weights, strict=True)))  # fmt: skip
    return {i: float(w) for i, w in enumerate(weights)}


def init_output_bias(model: keras.Model, info: DataInfo) -> None:
    """Start a sigmoid output at the class prior: bias = log(positives / negatives).

    The first epochs then learn features rather than the class balance. Only a final
    Dense layer of one unit is touched; any other head is left as the network made it.
    """
    counts = info.class_counts.get("train")
    last = model.layers[-1]
    if not counts or min(counts) == 0 or not isinstance(last, keras.layers.Dense):
        return
    if last.units != 1 or last.bias is None:
        return
    last.bias.assign(np.full(last.bias.shape, math.log(counts[1] / counts[0]), np.float32))


def describe_counts(counts: list[int], class_names: list[str]) -> str:
    """'cat=12, dog=30' for a param (cut to fit MLflow's 6,000 characters)."""
    text = ", ".join(f"{n}={c}" for n, c in zip(class_names, counts, strict=True))
    return text if len(text) <= 6000 else text[:5996] + " ..."


def predict_probabilities(model: keras.Model, ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(labels, (N, K) class probabilities) over a batched (images, labels) dataset."""
    labels, outputs = [], []
    for images, batch_labels in ds:
        labels.append(batch_labels.numpy())
        outputs.append(model.predict_on_batch(images))
    return np.concatenate(labels), class_probabilities(np.concatenate(outputs))


def log_evaluation(model: keras.Model, val_ds: tf.data.Dataset, info: DataInfo, history) -> None:
    """Score the validation split once (scikit-learn) and log the scores and plots."""
    import mlflow

    labels, probs = predict_probabilities(model, val_ds)
    scores = evaluation.classification_metrics(labels, probs)
    # one exact figure per metric for the final model, beside Keras' per-epoch estimates
    mlflow.log_metrics({f"final_val_{name}": value for name, value in scores.items()})
    with tempfile.TemporaryDirectory() as tmp:
        evaluation.plot_learning_curves(history, Path(tmp) / "learning_curves.png")
        evaluation.save_plots(labels, probs, info.class_names, Path(tmp))
        mlflow.log_artifacts(tmp, "plots")


def log_test(model: keras.Model, info: DataInfo) -> dict[str, float]:
    """Score the chosen model once on the test split; log test_* metrics and plots/test/.

    Nothing was chosen on these images (the best epoch and any tuning look at
    validation only), so these are the figures to report. Returns {} with no test split.
    """
    import mlflow

    if info.test_ds is None:
        print("no test split (test_split=0 or too few images): nothing to report on test")
        return {}
    labels, probs = predict_probabilities(model, info.test_ds)
    scores = evaluation.classification_metrics(labels, probs)
    scores.update(evaluation.per_class_metrics(labels, probs, info.class_names))
    scores = {f"test_{name}": value for name, value in scores.items()}
    mlflow.log_metrics(scores)
    with tempfile.TemporaryDirectory() as tmp:
        evaluation.save_plots(labels, probs, info.class_names, Path(tmp), split="test")
        mlflow.log_artifacts(tmp, "plots/test")
    return scores
