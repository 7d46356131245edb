"""The model after training: validate, predict, serve, export, and tidy up runs.

Usage:
    python lifecycle.py validate --model models:/image-classifier@candidate --data-source demo
    python lifecycle.py predict --model models:/image-classifier@champion --input cells/
    python lifecycle.py serve --model models:/image-classifier@champion --port 5001
    python lifecycle.py request --url http://127.0.0.1:5001 cell.png other.jpg
    python lifecycle.py export --model models:/image-classifier@champion --output serving/cells
    python lifecycle.py reap-runs --stale-minutes 60
    mlflow run . -e validate -P model=models:/image-classifier@candidate

A model is named by models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model,
or just an alias or version number of --model-name (default image-classifier).

The registered model takes image files and answers class names (engine.serving): it
decodes and resizes them with the engine's own code, as in training, and its network
rescales pixels internally. predict runs that same model in this process; validate and
export use its raw-pixel Keras network.
From train.py this uses only the public hooks: Config and load_data.

Tracking goes to $MLFLOW_TRACKING_URI, or to the local store in this folder, as for
train.py.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import train
from engine import evaluation, serving, tracking
from engine.common import IMAGE_EXTENSIONS, image_files
from engine.config import UserError, add_config_flags, config_from, parse_bool
from engine.network import class_probabilities

DEFAULT_MODEL_NAME = train.Config().registered_model_name
# validate's own flags; every other Config knob is a flag too, so a fork's own data
# source gets the knobs its load_data reads.
VALIDATE_OWN_FLAGS = ("experiment_name",)
# Metrics where a smaller value is the better one.
LOWER_IS_BETTER = ("loss",)


# ----------------------------------------------------------------------------
# Which model: references, metadata, loading
# ----------------------------------------------------------------------------


@dataclass
class ModelRef:
    """A model the user named, resolved against the registry."""

    uri: str  # what MLflow loads: models:/NAME/VERSION or runs:/...
    name: str | None  # registered model name (None for runs:/ URIs)
    version: str | None  # registered version number
    run_id: str | None  # the training run that logged it

    def __str__(self) -> str:
        return f"{self.name} version {self.version}" if self.name else self.uri


def resolve_model(text: str, default_name: str = DEFAULT_MODEL_NAME) -> ModelRef:
    """Turn what the user typed into a ModelRef with a fixed version.

    Args:
        text: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH, a local path,
            or a bare alias or version number of `default_name`.
        default_name: the registered model a bare alias or version refers to.

    Raises:
        UserError: the name, version or alias does not exist.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    if (
        text.startswith(("runs:/", "models:/m-"))  # a run's artifact, or a logged model's id
        or "://" in text
        or Path(text).exists()
    ):
        run_id = text.split("/")[1] if text.startswith("runs:/") else None
        return ModelRef(uri=text, name=None, version=None, run_id=run_id)
    if text.startswith("models:/"):
        body = text.removeprefix("models:/")
        if "@" in body:
            name, alias, version = *body.split("@", 1), None
        elif "/" in body:
            name, version = body.rsplit("/", 1)
            alias = None
        else:
            raise UserError(
                f"'{text}' names no version: write models:/{body}@ALIAS or models:/{body}/N"
            )
    elif text.isdigit():
        name, alias, version = default_name, None, text
    else:
        name, alias, version = default_name, text, None
    try:
        if alias is not None:
            model_version = client.get_model_version_by_alias(name, alias)
        else:
            model_version = client.get_model_version(name, version)
    except MlflowException as err:
        known = _known_versions(client, name)
        what = f"alias '{alias}'" if alias is not None else f"version {version}"
        raise UserError(
            f"registered model '{name}' has no {what} in {mlflow.get_tracking_uri()}. "
            f"{known} Train one (python train.py ...), or name another with --model."
        ) from err
    return ModelRef(
        uri=f"models:/{name}/{model_version.version}",
        name=name,
        version=str(model_version.version),
        run_id=model_version.run_id,
    )


def _known_versions(client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return f"There is no registered model '{name}' at all."
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    aliases = ", ".join(f"{a}->v{v}" for a, v in sorted((model.aliases or {}).items()))
    return f"It has versions {versions or 'none'}; aliases: {aliases or 'none'}."


@dataclass
class ModelSpec:
    """What a logged model expects as input and what its outputs mean."""

    image_size: int
    channels: int
    class_names: list[str]


def model_spec(uri: str) -> ModelSpec:
    """Read image size, channels and class names from the logged model's metadata.

    The input shape falls back to the model signature; class names fall back to
    class_0..class_K-1 (with a warning) for models logged without metadata.
    """
    import mlflow

    info = mlflow.models.get_model_info(uri)
    metadata = info.metadata or {}
    shape = None
    if info.signature is not None and info.signature.inputs is not None:
        with contextlib.suppress(AttributeError, IndexError, TypeError):
            shape = info.signature.inputs.inputs[0].shape  # (-1, H, W, C)
    image_size = metadata.get("image_size") or (shape[1] if shape else None)
    channels = metadata.get("channels") or (shape[3] if shape else None)
    if not image_size or not channels:
        raise UserError(
            f"{uri} records no input shape (no image_size/channels metadata and no "
            "signature); log it with train.py, which records both."
        )
    class_names = metadata.get("class_names")
    if not class_names:
        outputs = info.signature.outputs.inputs[0].shape[-1] if info.signature else 1
        count = 2 if outputs == 1 else outputs
        class_names = [f"class_{i}" for i in range(count)]
        print(f"warning: {uri} has no class_names metadata; calling them {class_names}")
    return ModelSpec(int(image_size), int(channels), [str(c) for c in class_names])


def load_model(uri: str):
    """The raw-pixel Keras network behind an MLflow model URI (for evaluation and export)."""
    return serving.load_network(uri)


# ----------------------------------------------------------------------------
# Input files
# ----------------------------------------------------------------------------


def collect_paths(inputs: list[str], path_column: str = "path") -> list[str]:
    """Image paths from folders (searched recursively), image files and CSV/JSON tables.

    A table's relative paths are read from the table's folder, as in the dataframe
    source.

    Raises:
        UserError: an input does not exist, a table lacks the path column, or no
            image is found at all.
    """
    paths: list[str] = []
    for text in inputs:
        item = Path(text).expanduser()
        if not item.exists():
            raise UserError(f"input {item} does not exist")
        if item.is_dir():
            found = [os.path.abspath(path) for path in image_files(item)]
            if not found:
                raise UserError(f"folder {item} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif item.suffix.lower() in (".csv", ".json"):
            paths += _table_paths(item, path_column)
        else:
            paths.append(str(item.resolve()))
    if not paths:
        raise UserError("no input images: give folders, image files or a CSV/JSON table")
    return paths


def _table_paths(table: Path, path_column: str) -> list[str]:
    from engine.sources import read_table, table_column, table_paths

    rows = read_table(table)
    return table_paths(table, table_column(table, rows, path_column, "--path-column"))


# ----------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------


def is_better(candidate: float, champion: float, metric: str, min_delta: float = 0.0) -> bool:
    """Whether the candidate's score beats the champion's by more than min_delta."""
    if metric in LOWER_IS_BETTER:
        return candidate < champion - min_delta
    return candidate > champion + min_delta


# ----------------------------------------------------------------------------
# validate: evaluate a version, log it, move the champion alias
# ----------------------------------------------------------------------------


@dataclass
class Evaluation:
    ref: ModelRef
    spec: ModelSpec
    labels: np.ndarray
    probs: np.ndarray
    metrics: dict[str, float]


@dataclass
class ValidationResult:
    run_id: str
    candidate: Evaluation
    champion: Evaluation | None
    promoted: bool
    reason: str


def evaluate(ref: ModelRef, data_cfg: train.Config, split: str, data_cache: dict) -> Evaluation:
    """Predict the chosen split of the data with one model version and score it."""
    spec = model_spec(ref.uri)
    cfg = dataclasses.replace(data_cfg, image_size=spec.image_size, channels=spec.channels)
    key = (spec.image_size, spec.channels)
    if key not in data_cache:  # the champion usually shares the candidate's input shape
        print(f"loading data ({cfg.data_source}, {split} split, {key[0]}px x {key[1]}) ...")
        train_ds, val_ds, info = train.load_data(cfg)
        _require_same_classes(ref, spec, info.class_names)
        ds = {"test": info.test_ds, "validation": val_ds}.get(split, val_ds.concatenate(train_ds))
        if split == "all" and info.test_ds is not None:
            ds = ds.concatenate(info.test_ds)
        if ds is None:
            raise UserError(
                f"the data has no test split ({cfg.data_source}, test_split {cfg.test_split}): "
                "give --test-split above 0 (the value training used), or decide on "
                "--split validation, knowing training chose its best epoch on it"
            )
        images, labels = [], []
        for x, y in ds.as_numpy_iterator():
            images.append(x.astype(np.uint8))  # whole pixel values: a quarter of float32's memory
            labels.append(y)
        data_cache[key] = (np.concatenate(images), np.concatenate(labels), info.class_names)
    else:  # the data another version was scored on: the same classes?
        _require_same_classes(ref, spec, data_cache[key][2])
    images, labels, _ = data_cache[key]
    import tensorflow as tf

    batches = tf.data.Dataset.from_tensor_slices(images).batch(data_cfg.batch_size)
    batches = batches.map(lambda x: tf.cast(x, tf.float32))
    probs = class_probabilities(load_model(ref.uri).predict(batches, verbose=0))
    return Evaluation(ref, spec, labels, probs, evaluation.classification_metrics(labels, probs))


def _require_same_classes(ref: ModelRef, spec: ModelSpec, class_names: list[str]) -> None:
    if list(class_names) != list(spec.class_names):
        raise UserError(
            f"the data's classes {list(class_names)} differ from the classes {ref} was "
            f"trained on {spec.class_names}; evaluate it on data with the same classes"
        )


def validate(
    model: str,
    data_cfg: train.Config,
    split: str = "test",
    metric: str = "auc",
    champion_alias: str = "champion",
    min_delta: float = 0.0,
    experiment_name: str = "model-validation",
    model_name: str = DEFAULT_MODEL_NAME,
    promote: bool = True,
) -> ValidationResult:
    """Evaluate a registered version and the current champion on the same held-out data.

    Logs the candidate's metrics (and the champion's, prefixed champion_), a confusion
    matrix, a ROC curve for two classes and the decision to a new run; tags the model
    version with the result; moves `champion_alias` to the candidate when there is no
    champion or the candidate scores better on `metric` (lower for loss).

    Args:
        model: the candidate (see resolve_model).
        data_cfg: a train.Config that selects the data (data_source, data_dir, seed, ...).
        split: "test" (the split load_data makes with this seed and test_split, which
            no choice in training was made on), "validation" (the one training picked
            its best epoch on: an optimistic score) or "all" (every image of the
            source: for a separate test set).
        metric: accuracy, auc, loss, precision, recall or f1.
        champion_alias: the alias that marks the model in production.
        min_delta: the candidate must beat the champion by more than this.
        experiment_name: where the validation run goes.
        model_name: the registered model a bare alias or version refers to.
        promote: False only reports what it would decide.
    """
    import mlflow

    tracking.configure_tracking()
    candidate_ref = resolve_model(model, model_name)
    if candidate_ref.name is None:
        raise UserError(
            f"validate needs a registered model version, not {model}: "
            "give models:/NAME@ALIAS, models:/NAME/VERSION or a version number"
        )
    client = mlflow.MlflowClient()
    try:
        champion_version = client.get_model_version_by_alias(candidate_ref.name, champion_alias)
        champion_ref = resolve_model(
            f"models:/{candidate_ref.name}/{champion_version.version}", model_name
        )
    except mlflow.exceptions.MlflowException:
        champion_ref = None

    data_cache: dict = {}
    candidate = evaluate(candidate_ref, data_cfg, split, data_cache)
    if metric not in candidate.metrics:
        raise UserError(
            f"metric '{metric}' is not computed here; choose one of {sorted(candidate.metrics)}"
        )
    champion = None
    if champion_ref is not None and champion_ref.version != candidate_ref.version:
        champion = evaluate(champion_ref, data_cfg, split, data_cache)

    score = candidate.metrics[metric]
    images = len(candidate.labels)
    if champion_ref is None:
        promoted = True
        reason = (f"there is no '{champion_alias}' yet, so {candidate_ref} becomes it "
                  f"({metric} {score:.4f} on {images} {split}-split images)")  # fmt: skip
    elif champion is None:
        promoted = False
        reason = f"{candidate_ref} already is the '{champion_alias}'"
    else:
        best = champion.metrics[metric]
        promoted = is_better(score, best, metric, min_delta)
        direction = "lower" if metric in LOWER_IS_BETTER else "higher"
        verdict = "beats" if promoted else "does not beat"
        reason = (
            f"{candidate_ref} {verdict} the '{champion_alias}' {champion_ref}: {metric} "
            f"{score:.4f} vs {best:.4f} on the same {images} {split}-split images "
            f"({direction} is better" + (f", by more than {min_delta}" if min_delta else "") + ")"
        )
    if not promote and promoted:
        reason += "; --no-promote: the alias stays where it is"

    mlflow.set_experiment(experiment_name)
    run_name = f"validate-{candidate_ref.name}-v{candidate_ref.version}"
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({
            "model_name": candidate_ref.name, "model_version": candidate_ref.version,
            "decision": "promoted" if promoted and promote else "kept",
        })  # fmt: skip
        mlflow.log_params({
            "model_uri": candidate_ref.uri, "training_run_id": candidate_ref.run_id,
            "champion_alias": champion_alias,
            "champion_version": champion_ref.version if champion_ref else "none",
            "metric": metric, "min_delta": min_delta, "split": split, "images": images,
            "data_source": data_cfg.data_source, "data_dir": data_cfg.data_dir,
            "seed": data_cfg.seed, "val_split": data_cfg.val_split,
            "test_split": data_cfg.test_split,
        })  # fmt: skip
        mlflow.log_metrics(candidate.metrics)
        if champion is not None:
            mlflow.log_metrics({f"champion_{k}": v for k, v in champion.metrics.items()})
        _log_plots(candidate)
        mlflow.log_text(reason + "\n", "decision.txt")
        client.set_model_version_tag(
            candidate_ref.name, candidate_ref.version, f"validation_{metric}", f"{score:.6f}"
        )
        client.set_model_version_tag(
            candidate_ref.name, candidate_ref.version, "validation_run_id", run.info.run_id
        )
    if promoted and promote:
        client.set_registered_model_alias(candidate_ref.name, champion_alias, candidate_ref.version)
    return ValidationResult(run.info.run_id, candidate, champion, promoted and promote, reason)


def _log_plots(scored: Evaluation) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        evaluation.save_plots(scored.labels, scored.probs, scored.spec.class_names, Path(tmp))
        mlflow.log_artifacts(tmp, "plots")


# ----------------------------------------------------------------------------
# predict: a CSV of path, predicted class, probability
# ----------------------------------------------------------------------------


def predict(
    model: str,
    inputs: list[str],
    output: str | Path,
    path_column: str = "path",
    batch_size: int = 64,
    model_name: str = DEFAULT_MODEL_NAME,
) -> Path:
    """Classify every image found in `inputs` with the registered model; write a CSV.

    The model answers as it does when served (engine.serving.ImageClassifier, same
    decoding); the CSV has path, predicted_class, probability (of the predicted class)
    and probability_<class> for every class. Unreadable files are left out with a
    warning (as in training).

    Returns:
        The path of the CSV written.
    """
    tracking.configure_tracking()
    ref = resolve_model(model, model_name)
    spec = model_spec(ref.uri)
    from engine.images import report_skipped

    paths = collect_paths(inputs, path_column)
    print(f"predicting {len(paths)} image(s) with {ref} ({spec.image_size}px, {spec.channels} ch)")
    classifier = serving.load_classifier(ref.uri)
    rows, reasons = [], {}
    for start in range(0, len(paths), batch_size):
        batch = paths[start : start + batch_size]
        answers = classifier.classify([Path(path).read_bytes() for path in batch])
        for path, answer in zip(batch, answers.to_dict(orient="records"), strict=True):
            if answer["error"] is None:
                rows.append((path, answer))
            else:
                reasons[path] = answer["error"]
    report_skipped(sorted(reasons), "unreadable file(s)", reasons)
    if not rows:
        raise UserError("none of the input files is a readable image")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "predicted_class", "probability",
                         *(f"probability_{name}" for name in spec.class_names)])  # fmt: skip
        for path, answer in rows:
            writer.writerow([path, answer["class"], f"{answer['probability']:.6f}",
                             *(f"{p:.6f}" for p in answer["probabilities"].values())])  # fmt: skip
    counts = {name: sum(a["class"] == name for _, a in rows) for name in spec.class_names}
    print(f"wrote {len(rows)} predictions to {output}: {counts}")
    return output


# ----------------------------------------------------------------------------
# serve and request: mlflow models serve, and a client that sends images to it
# ----------------------------------------------------------------------------


def serve_command(uri: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The `mlflow models serve` command line for a model URI (local environment)."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    return [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "models", "serve",
        "-m", uri, "--host", host, "--port", str(port), "--env-manager", "local",
    ]  # fmt: skip


def serve(model: str, port: int, host: str = "127.0.0.1", model_name: str = DEFAULT_MODEL_NAME):
    """Replace this process with `mlflow models serve` for a registered version."""
    import mlflow

    tracking_uri = tracking.configure_tracking()
    ref = resolve_model(model, model_name)
    with socket.socket() as sock:
        if sock.connect_ex((host, port)) == 0:
            raise UserError(f"port {port} on {host} is taken; choose another with --port")
    command = serve_command(ref.uri, port, host)
    print(f"serving {ref} from {mlflow.get_tracking_uri()} on http://{host}:{port}")
    print(f"  ask it: python lifecycle.py request --url http://{host}:{port} IMAGE...")
    print(f"  health: curl http://{host}:{port}/ping ; stop with Ctrl-C")
    sys.stdout.flush()
    # mlflow starts uvicorn by name: the venv's bin must be on PATH even when not activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    os.execvpe(command[0], command, env)


def request_body(paths: list[str]) -> bytes:
    """The JSON body /invocations takes for image files: base64 files in column `image`."""
    try:
        records = [{serving.IMAGE_COLUMN: serving.encode_file(path)} for path in paths]
    except OSError as err:
        raise UserError(f"cannot read {err.filename}: {err.strerror}") from err
    return json.dumps({"dataframe_records": records}).encode()


def request_predictions(url: str, paths: list[str], timeout: float = 60) -> list[dict]:
    """POST image files to a `mlflow models serve` endpoint; return one answer per file.

    Each answer is a dict: class, probability, probabilities ({class: probability}),
    error (None, or why the file could not be read).
    """
    req = urllib.request.Request(
        url.rstrip("/") + "/invocations",
        data=request_body(paths),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as err:
        raise UserError(f"{url} answered {err.code}: {err.read().decode()[:500]}") from err
    except (urllib.error.URLError, OSError) as err:
        raise UserError(f"no answer from {url} ({err}); is `make serve` running?") from err
    return answer["predictions"]


def describe_answer(path: str, answer: dict) -> str:
    """One line per image: `path: class (probability)`, or `path: error: why`."""
    if answer.get("error"):
        return f"{path}: error: {answer['error']}"
    return f"{path}: {answer['class']} ({answer['probability']:.4f})"


# ----------------------------------------------------------------------------
# reap-runs: runs whose process died stay RUNNING; mark them FAILED
# ----------------------------------------------------------------------------


def _process_gone(tags: dict[str, str]) -> bool:
    """True when the run's tags name a process on this machine that no longer exists."""
    host, pid = tags.get("process.host"), (tags.get("process.pid") or "").strip()
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def reap_runs(
    experiment_names: list[str] | None = None, stale_minutes: float = 60, dry_run: bool = False
) -> list[str]:
    """Mark RUNNING runs whose process is gone as FAILED, and say why in a tag.

    A run counts as gone when its `process.host`/`process.pid` tags name a process on
    this machine that has exited, or when nothing (start, metric) has happened in it
    for `stale_minutes`.

    Returns:
        The ids of the runs marked (or, with dry_run, that would be).
    """
    import mlflow
    from mlflow.entities import ViewType

    tracking.configure_tracking()
    client = mlflow.MlflowClient()
    if experiment_names:
        experiments = [client.get_experiment_by_name(n) for n in experiment_names]
        missing = [n for n, e in zip(experiment_names, experiments, strict=True) if e is None]
        if missing:
            raise UserError(f"no experiment named {', '.join(missing)}")
    else:
        experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    ids = [e.experiment_id for e in experiments]
    runs = client.search_runs(ids, "attributes.status = 'RUNNING'", max_results=1000) if ids else []
    now_ms = time.time() * 1000
    reaped = []
    for run in runs:
        last = run.info.start_time or 0
        for key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            last = max([last, *(m.timestamp for m in history)])
        idle_minutes = (now_ms - last) / 60_000
        if _process_gone(run.data.tags):
            why = f"its process {run.data.tags['process.pid']} on this machine has exited"
        elif idle_minutes >= stale_minutes:
            why = f"nothing was logged to it for {idle_minutes:.0f} min (limit {stale_minutes:g})"
        else:
            continue
        print(f"{'would mark' if dry_run else 'marking'} run {run.info.run_id} "
              f"({run.info.run_name}) FAILED: {why}")  # fmt: skip
        if not dry_run:
            client.set_tag(run.info.run_id, "failure_reason", f"reaped by lifecycle.py: {why}")
            client.set_terminated(run.info.run_id, "FAILED")
        reaped.append(run.info.run_id)
    if not reaped:
        print(f"no stale RUNNING runs ({len(runs)} running, all active)")
    return reaped


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _add_model_flags(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--model", default=default,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a bare "
        "alias or version number of --model-name",
    )  # fmt: skip
    parser.add_argument(
        "--model-name", default=DEFAULT_MODEL_NAME, help="registered model a bare alias refers to"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = argparse.ArgumentDefaultsHelpFormatter

    p = commands.add_parser("validate", help="evaluate a version; move `champion` if it wins",
                            formatter_class=defaults)  # fmt: skip
    _add_model_flags(p, f"models:/{DEFAULT_MODEL_NAME}@candidate")
    p.add_argument("--metric", default="auc",
                   choices=["accuracy", "auc", "loss", "precision", "recall", "f1"],
                   help="what decides; loss: lower is better, the others higher")  # fmt: skip
    p.add_argument("--champion-alias", default="champion", help="alias of the model in use")
    p.add_argument("--min-delta", type=float, default=0.0,
                   help="the candidate must beat the champion by more than this")  # fmt: skip
    p.add_argument("--split", choices=["test", "validation", "all"], default="test",
                   help="test: the split train.py holds out with the same seed and test_split, "
                   "which no training choice saw; validation: the split that picked the best "
                   "epoch (optimistic); all: every image (a separate test set)")  # fmt: skip
    p.add_argument("--experiment-name", default="model-validation", help="experiment of the run")
    p.add_argument("--promote", type=parse_bool, default=True, metavar="BOOL",
                   help="false: report the decision but leave the alias alone")  # fmt: skip
    add_config_flags(p, train.Config, [f.name for f in dataclasses.fields(train.Config)
                                       if f.name not in VALIDATE_OWN_FLAGS])  # fmt: skip

    p = commands.add_parser(
        "predict", help="classify images; write a CSV", formatter_class=defaults
    )
    _add_model_flags(p, f"models:/{DEFAULT_MODEL_NAME}@champion")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="image folders (searched recursively), image files, or CSV/JSON "
                   "tables with a path column")  # fmt: skip
    p.add_argument("--output", default="outputs/predictions.csv", help="CSV to write")
    p.add_argument("--path-column", default="path", help="tables: the column of image paths")
    p.add_argument("--batch-size", type=int, default=64, help="images per prediction batch")

    p = commands.add_parser("serve", help="REST endpoint: mlflow models serve",
                            formatter_class=defaults)  # fmt: skip
    _add_model_flags(p, f"models:/{DEFAULT_MODEL_NAME}@champion")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    p.add_argument("--port", type=int, default=5001, help="port to listen on")

    p = commands.add_parser("request", help="send image files to a served model; print classes",
                            formatter_class=defaults)  # fmt: skip
    p.add_argument("--url", default="http://127.0.0.1:5001", help="the served model")
    p.add_argument("--print-json", action="store_true",
                   help="print the request body instead of sending it (for curl)")  # fmt: skip
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, GIF, WebP)")

    p = commands.add_parser("export", help="write a TF Serving SavedModel",
                            formatter_class=defaults)  # fmt: skip
    _add_model_flags(p, f"models:/{DEFAULT_MODEL_NAME}@champion")
    p.add_argument("--output", default=f"outputs/serving/{DEFAULT_MODEL_NAME}",
                   help="TF Serving model base path; the version folder goes inside")  # fmt: skip
    p.add_argument("--version", type=int, default=1, help="version folder number")

    p = commands.add_parser("reap-runs", help="mark RUNNING runs whose process died FAILED",
                            formatter_class=defaults)  # fmt: skip
    p.add_argument("--experiment", action="append", metavar="NAME",
                   help="limit to this experiment (repeatable; default all)")  # fmt: skip
    p.add_argument("--stale-minutes", type=float, default=60,
                   help="a run with nothing logged for this long counts as dead")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="only list what would be marked")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "validate":
            data_cfg = config_from(train.Config, vars(args))
            result = validate(
                args.model, data_cfg, split=args.split, metric=args.metric,
                champion_alias=args.champion_alias, min_delta=args.min_delta,
                experiment_name=args.experiment_name, model_name=args.model_name,
                promote=args.promote,
            )  # fmt: skip
            scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted(result.candidate.metrics.items()))
            print(f"{result.candidate.ref}: {scores}")
            if result.champion is not None:
                scores = ", ".join(
                    f"{k} {v:.4f}" for k, v in sorted(result.champion.metrics.items())
                )
                print(f"champion {result.champion.ref}: {scores}")
            print(("PROMOTED: " if result.promoted else "KEPT: ") + result.reason)
            print(f"validation run: {result.run_id}")
        elif args.command == "predict":
            predict(args.model, args.input, args.output, args.path_column, args.batch_size,
                    args.model_name)  # fmt: skip
        elif args.command == "serve":
            serve(args.model, args.port, args.host, args.model_name)
        elif args.command == "request":
            if args.print_json:
                sys.stdout.write(request_body(args.images).decode() + "\n")
                return 0
            for path, answer in zip(args.images, request_predictions(args.url, args.images),
                                    strict=True):  # fmt: skip
                print(describe_answer(path, answer))
        elif args.command == "export":
            tracking.configure_tracking()
            ref = resolve_model(args.model, args.model_name)
            target = tracking.export_tf_serving(load_model(ref.uri), args.output, args.version)
            print(f"wrote {ref} as a TF Serving SavedModel to {target}")
            print(f"serve it: see doc/serving.md (model base path {Path(args.output).resolve()})")
        elif args.command == "reap-runs":
            reap_runs(args.experiment, args.stale_minutes, args.dry_run)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
