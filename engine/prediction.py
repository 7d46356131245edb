"""A registered version put to work: predict image files into a CSV in this process, serve
it over REST (`mlflow models serve`), or write it for TF Serving.

predict runs the same ImageClassifier the server runs (engine.serving): training's own
decoding, the same answers.
"""

from __future__ import annotations

import csv
import os
import socket
import sys
from pathlib import Path

import mlflow

from engine import serving, tracking
from engine.common import IMAGE_EXTENSIONS, image_files
from engine.config import UserError
from engine.images import report_skipped
from engine.registry import DEFAULT_MODEL_NAME, load_model, model_spec, resolve_model
from engine.sources import read_table, table_column, table_paths


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
            rows = read_table(item)
            paths += table_paths(item, table_column(item, rows, path_column, "--path-column"))
        else:
            paths.append(str(item.resolve()))
    if not paths:
        raise UserError("no input images: give folders, image files or a CSV/JSON table")
    return paths


def _write_csv(output: Path, rows: list[tuple[str, dict]], class_names: list[str]) -> None:
    """path, predicted_class, probability, probability_<class> for each class."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as f:
        writer = csv.writer(f)
        header = ["path", "predicted_class", "probability"]
        writer.writerow(header + [f"probability_{name}" for name in class_names])
        for path, answer in rows:
            probabilities = [f"{p:.6f}" for p in answer["probabilities"].values()]
            writer.writerow([path, answer["class"], f"{answer['probability']:.6f}", *probabilities])


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
    paths = collect_paths(inputs, path_column)
    for warning in class_folder_warnings(inputs, spec.class_names):
        print(warning)
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
    _write_csv(output, rows, spec.class_names)
    counts = {name: sum(a["class"] == name for _, a in rows) for name in spec.class_names}
    print(f"wrote {len(rows)} predictions to {output}: {counts}")
    return output


def class_folder_warnings(inputs: list[str], class_names: list[str]) -> list[str]:
    """A warning for each input folder laid out in class folders that are not the model's
    classes: a fork's images asked of the demo's model answer with the demo's classes.

    Args:
        inputs: what predict was given (folders, files, tables).
        class_names: the model's classes.
    """
    warnings = []
    for text in inputs:
        folder = Path(text).expanduser()
        if not folder.is_dir():
            continue
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir() and image_files(p))
        if len(subfolders) >= 2 and set(subfolders) != set(class_names):
            warnings.append(
                f"warning: {folder} holds class folders [{', '.join(subfolders)}], but the "
                f"model answers [{', '.join(class_names)}]: is this the model for these "
                "images? (name another with --model, or MODEL=models:/NAME@ALIAS)"
            )
    return warnings


def serve_command(uri: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """The `mlflow models serve` command line for a model URI (local environment)."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    executable = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    options = ["-m", uri, "--host", host, "--port", str(port), "--env-manager", "local"]
    return [executable, "models", "serve", *options]


def serve(
    model: str, port: int, host: str = "127.0.0.1", model_name: str = DEFAULT_MODEL_NAME
) -> None:
    """Replace this process with `mlflow models serve` for a registered version."""
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


def export(
    model: str, output: str | Path, version: int = 1, model_name: str = DEFAULT_MODEL_NAME
) -> Path:
    """Write a registered version's network as a TF Serving SavedModel in output/version.

    Returns:
        The version folder written.
    """
    tracking.configure_tracking()
    ref = resolve_model(model, model_name)
    target = tracking.export_tf_serving(load_model(ref.uri), output, version)
    print(f"wrote {ref} as a TF Serving SavedModel to {target}")
    print(f"serve it: see doc/serving.md (model base path {Path(output).resolve()})")
    return target
