"""Where runs go, what each run logs per epoch, and logging and registering the model."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import keras

from engine.common import PROJECT_DIR, check_tracking_uri  # noqa: F401 (re-exported)
from engine.config import UserError

# MLflow's own defaults retry a request for about 4 minutes (7 retries, backoff 2) with a
# 120 s timeout each, so a server that died kept a run waiting ~1,000 s in the end. The
# template's budget: a refused connection fails in about 30 s, a server that accepts but
# never answers in about 3 min. Each is overridable in the environment.
HTTP_RETRY_BUDGET = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingLost(Exception):
    """The tracking server stopped answering during a run; the message says what to do."""


def bound_http_retries() -> None:
    """Set HTTP_RETRY_BUDGET where the environment does not say otherwise."""
    for name, value in HTTP_RETRY_BUDGET.items():
        os.environ.setdefault(name, value)


def server_unreachable(err: BaseException) -> str:
    """The reason when err (or an exception it came from) is a tracking server that gave
    no answer, else ""."""
    seen: BaseException | None = err
    for _ in range(10):  # the chain: what the end of `with start_run()` raised, and why
        if seen is None:
            break
        text = str(seen)
        kind = type(seen).__name__
        if "ConnectionError" in kind or "MaxRetryError" in kind or "Max retries exceeded" in text:
            return " ".join(text.split())[:300]
        seen = seen.__cause__ or seen.__context__
    return ""


def local_tracking_uri() -> str:
    """The embedded default store: mlflow.db in the project folder (what `make ui` reads)."""
    return f"sqlite:///{PROJECT_DIR / 'mlflow.db'}"


def configure_tracking(timeout: float = 5.0) -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI or the local store; fail fast if unusable.

    Returns:
        The tracking URI in use.

    Raises:
        UserError: the URI is malformed, or its server gave no answer within `timeout` s.
    """
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri()
    check_tracking_uri(uri, timeout)
    mlflow.set_tracking_uri(uri)
    return uri


def set_experiment(name: str, uri: str) -> None:
    """Use experiment `name`, keeping a local store's artifacts next to its database."""
    import mlflow

    if os.environ.get("MLFLOW_RUN_ID"):
        return  # `mlflow run` already created the run in its experiment
    if uri.startswith("sqlite:") and mlflow.get_experiment_by_name(name) is None:
        db_dir = Path(uri.removeprefix("sqlite:///")).parent
        mlflow.create_experiment(name, artifact_location=(db_dir / "mlruns").as_uri())
    mlflow.set_experiment(name)


def log_new_params(run_id: str, params: dict[str, Any]) -> None:
    """Log the params the run does not have yet.

    `mlflow run` has logged its entry point's parameters already (shell-quoted, so ''
    reads "''"), and a logged parameter may not change.
    """
    import mlflow

    logged = mlflow.get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})


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


class MlflowMetrics(keras.callbacks.Callback):
    """Log every epoch's train and validation metrics with step = the epoch's number,
    counted from 1 as Keras prints it (`Epoch 1/6` is step 1).

    When the tracking server does not answer, the epoch's metrics are kept and sent
    with the next epoch's, so a server restart mid-run loses nothing; the last try
    happens in flush() at the end of training.
    """

    def __init__(self):
        super().__init__()
        self.pending: list[tuple[int, dict[str, float]]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.pending.append((epoch, {k: float(v) for k, v in (logs or {}).items()}))
        self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        import mlflow

        while self.pending:
            epoch, metrics = self.pending[0]
            try:
                mlflow.log_metrics(metrics, step=epoch + 1)
            except Exception as err:
                if final:
                    raise
                print(f"warning: could not log epoch {epoch + 1} metrics ({err}); will retry")
                return
            self.pending.pop(0)


def log_dataset(lineage: dict) -> None:
    """Record the run's data as its MLflow dataset input (the run page's Datasets).

    Image files: a table of path, label and split; every source: its name, location
    and the digest it computed (for image files over each file's path, size and
    modification time, label and split, so an edited image changes it). Nothing here
    reads or stats the images.
    """
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    if not lineage:
        return
    source = LocalArtifactDatasetSource(lineage.get("source") or str(PROJECT_DIR))
    name, digest, table = lineage.get("name"), lineage.get("digest"), lineage.get("table")
    if table is None:
        dataset = MetaDataset(source, name=name, digest=digest)
    else:
        import pandas as pd

        dataset = mlflow.data.from_pandas(
            pd.DataFrame(table), source=source, targets="label", name=name, digest=digest
        )
    for attempt in range(1, DATASET_ATTEMPTS + 1):
        try:
            mlflow.log_input(dataset, context="training")
            return
        except mlflow.exceptions.MlflowException as err:
            # Runs started together on the same data (make sweep, make tune) log the same new
            # dataset at once; the server reads, then inserts, so all but one insert fail on
            # the unique key. Another try finds the row the first one wrote.
            if attempt == DATASET_ATTEMPTS or not any(k in str(err) for k in DUPLICATE_KEY):
                raise
            time.sleep(0.5 * attempt)


DATASET_ATTEMPTS = 3
# how SQLite and PostgreSQL word a unique key broken by a concurrent insert
DUPLICATE_KEY = ("UNIQUE constraint failed", "duplicate key value", "IntegrityError")


def export_tf_serving(model: keras.Model, directory: str | Path, version: int = 1) -> Path:
    """Write a Keras model as a TF Serving SavedModel in directory/version.

    TF Serving loads numbered version folders under a model's base path and serves
    the `serving_default` signature; Keras 3's export writes it. The model takes raw
    pixels 0..255 (float32, shape (None, H, W, C)) as in MLflow.

    Returns:
        The version folder written.
    """
    target = Path(directory) / str(version)
    if target.exists():
        raise UserError(f"{target} exists; TF Serving versions are immutable, pick --version")
    target.parent.mkdir(parents=True, exist_ok=True)
    model.export(str(target), format="tf_saved_model", verbose=False)
    return target


def log_model(
    model: keras.Model,
    example,
    class_names: list[str],
    registered_model_name: str,
    model_alias: str,
    export_savedmodel: bool,
) -> tuple[str, str | None]:
    """Log the model that takes image files; register it; set the alias.

    The logged model is `engine.serving.ImageClassifier` (base64 image files in, class
    names and probabilities out) with the Keras network as its artifact, a signature,
    a real PNG as input example and metadata (class names, image size, channels).

    Args:
        example: one batch of input images (the input example and the image shape).

    Returns:
        (the logged model's URI, the registered version or None when not registered).
    """
    import mlflow

    from engine import serving

    model_info = serving.log_classifier(model, example, class_names, registered_model_name)
    if export_savedmodel:
        with tempfile.TemporaryDirectory() as tmp:
            export_tf_serving(model, tmp)
            mlflow.log_artifacts(tmp, "tf_serving")
    version = model_info.registered_model_version
    if version is not None and model_alias:
        mlflow.MlflowClient().set_registered_model_alias(
            registered_model_name, model_alias, str(version)
        )
    return model_info.model_uri, None if version is None else str(version)


def check_registered_classes(cfg, class_names: list[str]) -> None:
    """Raise UserError before training when the run would add a version with other classes
    to a registered model (registered_classes_problem), unless cfg.allow_class_change."""
    import mlflow

    if not cfg.registered_model_name or cfg.allow_class_change or cfg.resume_run_id:
        return
    problem = registered_classes_problem(
        mlflow.MlflowClient(), cfg.registered_model_name, class_names
    )
    if problem:
        raise UserError(problem)


def registered_classes_problem(client, name: str, class_names: list[str]) -> str:
    """Why a new version of registered model `name` with these classes would mislead, or "".

    A fork's first run would otherwise land beside the demo's versions under the default
    name, and predict on the fork's images would answer with the demo's champion. The
    latest version's classes are read from its run's `class_names` parameter.

    Args:
        client: an MlflowClient.
        name: the registered model name the run would add a version to.
        class_names: this run's classes.
    """
    import mlflow

    try:
        versions = client.search_model_versions(
            f"name = '{name}'", max_results=1, order_by=["version_number DESC"]
        )
    except mlflow.exceptions.MlflowException:
        return ""  # no such model yet, or a registry without search: nothing to compare
    if not versions:
        return ""
    latest = versions[0]
    try:
        logged = client.get_run(latest.run_id).data.params.get("class_names", "")
    except mlflow.exceptions.MlflowException:
        return ""
    if not logged or logged.split(",") == list(class_names):
        return ""
    return (
        f"registered model '{name}' version {latest.version} was trained on the classes "
        f"[{logged.replace(',', ', ')}], this run's data has [{', '.join(class_names)}]: a new "
        f"version would sit beside it under one name, and predict with `@champion` could "
        f"answer with the other data's model. Name this model with --registered-model-name "
        f"NAME (under mlflow run: -P registered_model_name=NAME), or pass "
        f"--allow-class-change true to add it to '{name}' anyway. Nothing was trained."
    )
