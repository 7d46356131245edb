"""Asking a served model (`lifecycle.py request`): base64 image files in, one answer each.

The standard library only, so the client starts without TensorFlow or MLflow. The
served model (engine.serving) reads the same column name.
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from engine.config import UserError

IMAGE_COLUMN = "image"


def encode_file(path: str | Path) -> str:
    """An image file as the base64 text the served model takes."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def request_body(paths: list[str]) -> bytes:
    """The JSON body /invocations takes for image files: base64 files in column `image`."""
    try:
        records = [{IMAGE_COLUMN: encode_file(path)} for path in paths]
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


def request(url: str, paths: list[str], print_json: bool = False) -> None:
    """Send image files to a served model and print one line per file (`lifecycle.py request`).

    Args:
        url: the served model, e.g. http://127.0.0.1:5001.
        paths: the image files.
        print_json: print the request body instead of sending it (for curl).
    """
    if print_json:
        sys.stdout.write(request_body(paths).decode() + "\n")
        return
    for path, answer in zip(paths, request_predictions(url, paths), strict=True):
        print(describe_answer(path, answer))
