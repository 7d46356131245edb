"""run_training(cfg, load_data, define_network): from data to a registered model.

Everything that can be checked is checked before an MLflow run exists: the
config, the tracking server, the data (load_data's contract), the network
(define_network's contract) and the monitored metric. Every epoch is checkpointed,
so a crashed run resumes into the same MLflow run (--resume-run-id). The model
logged and registered is the best epoch's by cfg.monitor, and only after training
and evaluation succeed, so a failed run never gets a model version.

The run's phases, in order: `prepare` (resume or start, devices, data, network; all
before a run exists), `open_run`, `log_setup`, `fit`, then `log_results`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import tensorflow as tf

from engine import checkpoints, environment, multiworker, network, provenance, resuming, tracking
from engine.balance import class_weights, describe_counts, init_output_bias, warn_imbalance
from engine.common import PROJECT_DIR
from engine.config import RunConfig
from engine.data_contract import LoadData, check_data
from engine.datacheck_log import before_run, log_check
from engine.devices import choose_strategy, set_precision
from engine.images import DataInfo
from engine.run_record import log_run_record
from engine.scoring import log_evaluation, log_test


@dataclass
class TrainResult:
    run_id: str
    model_uri: str  # the logged model (models:/m-...), what MLflow loads
    model_version: str | None  # registered version, None when not registered
    metrics: dict[str, float]  # the best epoch's metrics
    tracking_uri: str
    best_epoch: int  # numbered from 1, as Keras prints epochs and as the metrics' steps
    test_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # test_* once
    registered_model_name: str = ""  # the run's own (a resumed run's, not the command line's)
    model_alias: str = ""


@dataclass
class RunSetup:
    """What the checks before a run leave: the config, where it goes, the data, the model."""

    cfg: RunConfig  # the crashed run's own config when resuming
    state: checkpoints.TrainingState
    checkpoint_root: Path
    tracking_uri: str
    strategy: tf.distribute.Strategy
    policy: str  # Keras' dtype policy
    global_batch_size: int  # batch_size on every replica together
    train_ds: tf.data.Dataset
    val_ds: tf.data.Dataset
    info: DataInfo
    model: keras.Model
    head: network.Head
    weights: dict[int, float] | None  # class weights, None: unweighted
    cluster: multiworker.Cluster | None = None  # the workers, under MultiWorkerMirroredStrategy
    chief: bool = True  # whether this process logs the run (all but a non-chief worker)


def run_training(
    cfg: RunConfig,
    load_data: LoadData,
    define_network: network.DefineNetwork,
    callbacks: list[keras.callbacks.Callback] | None = None,
    tags: dict[str, str] | None = None,
) -> TrainResult:
    """Check everything, train, evaluate and log one run; register its best epoch's model.

    With cfg.resume_run_id, reopen that crashed run and go on from its last checkpoint,
    with its own config.

    Args:
        cfg: the run's Config (a RunConfig subclass, so the engine's knobs are there).
        load_data: cfg -> (train_ds, val_ds, info), see engine.data_contract.
        define_network: (input_shape, num_classes, cfg) -> keras.Model, see engine.network.
        callbacks: more Keras callbacks, called after an epoch is checkpointed and logged
            (a tuner's pruning callback sets model.stop_training).
        tags: more tags for the run (e.g. mlflow.parentRunId for a tuning trial).

    Raises:
        UserError: a bad parameter, data, network or tracking server, before any run.
    """
    setup = prepare(cfg, load_data, define_network)
    before_run(setup.info, setup.cfg)  # --data-check strict stops before a run
    cfg, state = setup.cfg, setup.state
    best = checkpoints.BestEpoch(cfg.monitor, cfg.early_stopping_patience, state)
    run_id = ""
    try:
        with open_run(setup) as active:
            run_id = active.info.run_id
            folder = multiworker.checkpoint_folder(setup.checkpoint_root, run_id, setup.cluster)
            print(f"logging to {setup.tracking_uri}, run {run_id}")
            if setup.chief:
                log_setup(setup, run_id, folder, tags)
            fit(setup, run_id, folder, best, callbacks)
            results = log_results(setup) if setup.chief else ({}, {}, "", None)
            best_metrics, test_metrics, model_uri, model_version = results
    except Exception as err:
        lost = resuming.tracking_lost(err, setup.tracking_uri, run_id, cfg)
        if lost is None:
            raise
        raise lost from None
    if not cfg.keep_checkpoints or not setup.chief:
        checkpoints.remove(folder)

    return TrainResult(
        run_id=run_id,
        model_uri=model_uri,
        model_version=model_version,
        metrics=best_metrics,
        tracking_uri=setup.tracking_uri,
        best_epoch=state.best_epoch + 1,
        test_metrics=test_metrics,
        registered_model_name=cfg.registered_model_name,
        model_alias=cfg.model_alias,
    )


def prepare(cfg: RunConfig, load_data: LoadData, define_network: network.DefineNetwork) -> RunSetup:
    """Every check that comes before a run exists: config, server, checkpoint, data, network."""
    cfg.validate()
    tracking_uri = tracking.configure_tracking()
    root = checkpoints.checkpoint_root(cfg.checkpoint_dir)
    state = checkpoints.TrainingState(config=dataclasses.asdict(cfg))
    if cfg.resume_run_id:
        checkpoints.find_checkpoint(root, cfg.resume_run_id)
        resuming.open_resumed_run(cfg.resume_run_id)
        state = checkpoints.TrainingState.load(root / cfg.resume_run_id)
        cfg = resuming.resumed_config(cfg, state)
        print(
            f"resuming run {cfg.resume_run_id} after epoch {state.epoch + 1} of {cfg.epochs} "
            "with its own config"
        )
    keras.utils.set_random_seed(cfg.seed)
    cluster = multiworker.join_cluster(cfg.distribute_mode(), cfg.resume_run_id)
    strategy = choose_strategy(cfg)
    policy = set_precision(cfg)

    print("loading data ...")
    global_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size * strategy.num_replicas_in_sync)
    train_ds, val_ds, info = check_data(load_data(global_cfg))
    train_ds, val_ds = multiworker.shard(train_ds, cluster), multiworker.shard(val_ds, cluster)
    print(
        f"  {info.train_count} training / {info.val_count} validation / {info.test_count} "
        f"test images, classes {info.class_names}, shape {info.image_shape}"
    )
    warn_imbalance(info)

    print("building the network ...")
    steps_per_epoch = math.ceil(info.train_count / global_cfg.batch_size)
    with strategy.scope():
        model, head = network.build_network(
            define_network, info.image_shape, info.num_classes, cfg, steps_per_epoch
        )
    outputs = "one sigmoid output" if head.binary else f"{head.units} softmax outputs"
    print(f"  {model.name}: {model.count_params():,} parameters, {outputs}, {policy}")
    network.check_monitor(model, val_ds, head, info.num_classes, cfg.monitor)
    tracking.check_registered_classes(cfg, info.class_names)  # the registry, last
    weights = class_weights(cfg.class_weight, info)
    if head.binary and not cfg.resume_run_id:
        init_output_bias(model, info)
    return RunSetup(
        cfg=cfg,
        state=state,
        checkpoint_root=root,
        tracking_uri=tracking_uri,
        strategy=strategy,
        policy=policy,
        global_batch_size=global_cfg.batch_size,
        train_ds=train_ds,
        val_ds=val_ds,
        info=info,
        model=model,
        head=head,
        weights=weights,
        cluster=cluster,
        chief=cluster is None or cluster.chief,
    )


def open_run(setup: RunSetup) -> mlflow.ActiveRun:
    """Reopen the crashed run when resuming; else start a new run in cfg's experiment."""
    cfg = setup.cfg
    if not setup.chief:
        return multiworker.worker_run(cfg.resume_run_id, cfg.system_metrics)
    if cfg.resume_run_id:
        if os.environ.get("MLFLOW_RUN_ID", cfg.resume_run_id) != cfg.resume_run_id:
            # `mlflow run -P resume_run_id=...` made a run of its own: say where it went
            mlflow.MlflowClient().set_tag(
                os.environ["MLFLOW_RUN_ID"], "resumed_run_id", cfg.resume_run_id
            )
        os.environ.pop("MLFLOW_RUN_ID", None)
        return mlflow.start_run(run_id=cfg.resume_run_id, log_system_metrics=cfg.system_metrics)
    tracking.set_experiment(cfg.experiment_name, setup.tracking_uri)
    source = setup.info.source or "data"
    return mlflow.start_run(
        run_name=cfg.run_name or f"{setup.model.name}-{source}",
        log_system_metrics=cfg.system_metrics,
    )


def log_setup(setup: RunSetup, run_id: str, folder: Path, tags: dict[str, str] | None) -> None:
    """Check the code (a stale image stops here), then tag the run and log its params."""
    cfg, info, model = setup.cfg, setup.info, setup.model
    code = provenance.check_and_tag(run_id, PROJECT_DIR)  # stops a stale image
    mlflow.set_tags(
        {
            "git_commit": code["commit"],
            "data_source": info.source or "data",
            "network": model.name,
            "checkpoint_dir": str(folder),
            # `lifecycle.py reap-runs` marks the run FAILED once this process is gone
            "process.host": socket.gethostname(),
            "process.pid": str(os.getpid()),
            # the packages it ran with: lock/runtime.txt's digest, and any drift from it
            **environment.tags(),
            **(tags or {}),
        }
    )
    tracking.log_new_params(run_id, dataclasses.asdict(cfg))
    counts = {
        f"class_counts.{split}": describe_counts(split_counts, info.class_names)
        for split, split_counts in info.class_counts.items()
    }
    tracking.log_new_params(
        run_id,
        {
            "num_classes": info.num_classes,
            "class_names": ",".join(info.class_names),
            "train_count": info.train_count,
            "val_count": info.val_count,
            "test_count": info.test_count,
            **counts,
            "skipped_files": len(info.skipped_files),
            "replicas": setup.strategy.num_replicas_in_sync,
            "distribute_strategy": type(setup.strategy).__name__,
            "global_batch_size": setup.global_batch_size,
            "dtype_policy": setup.policy,
            "output_units": setup.head.units,
            **info.pipeline_params,  # data_pipeline (memory or stream), memory_budget
        },
    )
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    mlflow.log_text("\n".join(lines), "model_summary.txt")
    if not cfg.resume_run_id:
        tracking.log_dataset(info.lineage)
        log_run_record(cfg, info)  # the files and determinism `make reproduce` checks
        log_check(info.data_check)


def fit(
    setup: RunSetup,
    run_id: str,
    folder: Path,
    best: checkpoints.BestEpoch,
    callbacks: list[keras.callbacks.Callback] | None,
) -> None:
    """Train to cfg.epochs (from the last checkpoint when resuming), each epoch checkpointed
    and logged; a stopped run says how to resume it."""
    cfg, state, info, head = setup.cfg, setup.state, setup.info, setup.head
    initial_epoch = 0
    if cfg.resume_run_id:  # every worker from the chief's checkpoint
        checkpoints.resume(setup.model, setup.checkpoint_root / run_id, best)
        initial_epoch = state.epoch + 1
        if setup.chief and resuming.log_missing_epochs(run_id, state):
            print("  logged the metrics of a checkpointed epoch the crash had not sent")

    print(
        f"training for {cfg.epochs - initial_epoch} epoch(s), the best by {cfg.monitor} is kept ..."
    )
    metrics_logger = tracking.MlflowMetrics()
    # order matters: time the epoch, pick the best, checkpoint, then log
    all_callbacks = [
        tracking.EpochTimer(info.train_count),
        best,
        checkpoints.Checkpointer(folder, state, best),
        checkpoints.StopOnSignal(),
        *([metrics_logger] if setup.chief else []),
        *(callbacks or []),
    ]
    try:
        setup.model.fit(
            network.encode_labels(
                network.weigh_classes(setup.train_ds, setup.weights), head, info.num_classes
            ),
            validation_data=network.encode_labels(
                network.weigh_classes(setup.val_ds, setup.weights), head, info.num_classes
            ),
            epochs=cfg.epochs,
            initial_epoch=initial_epoch,
            callbacks=all_callbacks,
            shuffle=False,  # train_ds reshuffles itself every epoch
            verbose="auto" if sys.stdout.isatty() else 2,
        )
    except BaseException:  # SIGTERM arrives as SystemExit, Ctrl-C as KeyboardInterrupt
        if state.epoch >= 0 and setup.chief:
            resuming.say_how_to_resume(run_id, cfg)
        raise
    metrics_logger.flush()  # nothing to send on a non-chief worker


def log_results(setup: RunSetup) -> tuple[dict[str, float], dict[str, float], str, str | None]:
    """Log the best epoch, score the model on validation and test, log and register it.

    Returns:
        (the best epoch's metrics, the test_* metrics, the model's URI, its version).
    """
    cfg, state, model = setup.cfg, setup.state, setup.model
    if setup.strategy.num_replicas_in_sync > 1:  # predict_on_batch would run on every replica
        model = multiworker.local_model(model)
    best_metrics = {k: v[state.best_epoch] for k, v in state.history.items()}
    mlflow.log_metric("best_epoch", state.best_epoch + 1)  # numbered from 1, as the steps
    mlflow.log_metrics({f"best_{k}": v for k, v in best_metrics.items() if k.startswith("val_")})
    print(
        f"best epoch: {state.best_epoch + 1} of {state.epoch + 1} "
        f"({cfg.monitor} {state.best_value:.4f}); its weights are logged"
    )

    print("evaluating and logging plots and the model ...")
    val_predictions = log_evaluation(model, setup.val_ds, setup.info, state.history)
    test_metrics = log_test(model, setup.info, val_predictions)  # and likely label errors
    example = next(iter(setup.val_ds))[0].numpy()[:1].astype(np.float32)
    model_uri, model_version = tracking.log_model(
        model,
        example,
        setup.info.class_names,
        cfg.registered_model_name,
        cfg.model_alias,
        cfg.export_savedmodel,
    )
    return best_metrics, test_metrics, model_uri, model_version
