"""run_training(cfg, load_data, define_network): from data to a registered model.

Everything that can be checked is checked before an MLflow run exists: the
config, the tracking server, the data (load_data's contract) and the network
(define_network's contract). A model is registered only after training and
evaluation succeed, so a failed run never gets a model version.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from engine import evaluation, tracking
from engine.config import RunConfig, UserError
from engine.images import DataInfo
from engine.network import build_network, class_probabilities, encode_labels

LoadData = Callable[[Any], tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]]
DefineNetwork = Callable[[tuple[int, int, int], int, Any], keras.Model]

DATA_CONTRACT = (
    "load_data(cfg) must return (train_ds, val_ds, info): two batched tf.data.Datasets of "
    "(images (batch, H, W, C) float32 or uint8 pixel values 0..255, labels (batch,) integer "
    "class indices) and an engine.images.DataInfo; the engine's files_pipeline and "
    "arrays_pipeline build all three."
)


@dataclass
class TrainResult:
    run_id: str
    model_uri: str  # the logged model (models:/m-...), what MLflow loads
    model_version: str | None  # registered version, None when not registered
    metrics: dict[str, float]  # the last epoch's metrics
    tracking_uri: str


def choose_strategy(cfg: RunConfig) -> tf.distribute.Strategy:
    """MirroredStrategy over all GPUs when there are several, else the default strategy."""
    gpus = tf.config.list_physical_devices("GPU")
    if cfg.distribute and len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def set_precision(cfg: RunConfig) -> str:
    """Set Keras' global dtype policy: mixed_float16 on a GPU when asked, else float32."""
    has_gpu = bool(tf.config.list_physical_devices("GPU"))
    wanted = cfg.mixed_precision == "true" or (cfg.mixed_precision == "auto" and has_gpu)
    if wanted and not has_gpu:
        print("note: mixed precision needs a GPU; training in float32")
    policy = "mixed_float16" if wanted and has_gpu else "float32"
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
    for name, ds in (("train_ds", train_ds), ("val_ds", val_ds)):
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


def run_training(cfg: RunConfig, load_data: LoadData, define_network: DefineNetwork) -> TrainResult:
    """Check everything, train, evaluate and log one run; register its model.

    Args:
        cfg: the run's Config (a RunConfig subclass, so the engine's knobs are there).
        load_data: cfg -> (train_ds, val_ds, info), see DATA_CONTRACT.
        define_network: (input_shape, num_classes, cfg) -> keras.Model, see engine.network.

    Raises:
        UserError: a bad parameter, data, network or tracking server, before any run.
    """
    import mlflow

    cfg.validate()
    tracking_uri = tracking.configure_tracking()
    keras.utils.set_random_seed(cfg.seed)
    strategy = choose_strategy(cfg)
    replicas = strategy.num_replicas_in_sync
    policy = set_precision(cfg)

    print("loading data ...")
    global_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * replicas)
    train_ds, val_ds, info = check_data(load_data(global_cfg))
    print(f"  {info.train_count} training / {info.val_count} validation images, "
          f"classes {info.class_names}, shape {info.image_shape}")  # fmt: skip

    print("building the network ...")
    with strategy.scope():
        model, head = build_network(define_network, info.image_shape, info.num_classes, cfg)
    outputs = "one sigmoid output" if head.binary else f"{head.units} softmax outputs"
    print(f"  {model.name}: {model.count_params():,} parameters, {outputs}")

    tracking.set_experiment(cfg.experiment_name, tracking_uri)
    source = info.source or "data"
    with mlflow.start_run(run_name=cfg.run_name or f"{model.name}-{source}") as run:
        print(f"logging to {tracking_uri}, run {run.info.run_id}")
        mlflow.set_tags({
            "git_commit": tracking.git_commit(), "data_source": source, "network": model.name,
            # `lifecycle.py reap-runs` marks the run FAILED once this process is gone
            "process.host": socket.gethostname(), "process.pid": str(os.getpid()),
        })  # fmt: skip
        tracking.log_new_params(run.info.run_id, dataclasses.asdict(cfg))
        mlflow.log_params({
            "num_classes": info.num_classes, "class_names": ",".join(info.class_names),
            "train_count": info.train_count, "val_count": info.val_count,
            "skipped_files": len(info.skipped_files), "replicas": replicas,
            "global_batch_size": global_cfg.batch_size, "dtype_policy": policy,
            "output_units": head.units,
        })  # fmt: skip
        lines: list[str] = []
        model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
        mlflow.log_text("\n".join(lines), "model_summary.txt")

        print(f"training for {cfg.epochs} epoch(s) ...")
        metrics_logger = tracking.MlflowMetrics()
        history = model.fit(
            encode_labels(train_ds, head, info.num_classes),
            validation_data=encode_labels(val_ds, head, info.num_classes),
            epochs=cfg.epochs,
            callbacks=[metrics_logger],
            shuffle=False,  # train_ds reshuffles itself every epoch
            verbose="auto" if sys.stdout.isatty() else 2,
        )
        metrics_logger.flush()

        print("evaluating and logging plots and the model ...")
        result_metrics = {k: float(v[-1]) for k, v in history.history.items()}
        log_evaluation(model, val_ds, info, history.history)
        example = next(iter(val_ds))[0].numpy()[:1].astype(np.float32)
        model_uri, model_version = tracking.log_model(
            model, example, info.class_names, cfg.registered_model_name, cfg.model_alias,
            cfg.export_savedmodel,
        )  # fmt: skip

    return TrainResult(
        run_id=run.info.run_id,
        model_uri=model_uri,
        model_version=model_version,
        metrics=result_metrics,
        tracking_uri=tracking_uri,
    )


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
