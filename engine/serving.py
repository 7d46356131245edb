"""The registered model: encoded image files in, class names and probabilities out.

What `models:/NAME@ALIAS` loads and `mlflow models serve` serves is an MLflow pyfunc
model, `ImageClassifier`. It takes a column `image` of base64-encoded image files
(PNG, JPEG, BMP, GIF or WebP, any size, gray, RGB or RGBA), decodes and resizes them with
training's own `engine.images.decode_image` (this package travels with the model as
its code), runs the Keras network, and answers one row per image:

    class          the predicted class name
    probability    its probability
    probabilities  {class name: probability} for every class
    error          None, or why this image could not be read (the other columns None)

The raw-pixel Keras network is an artifact of the same model (`network.keras`):
`load_network(uri)` returns it for evaluation and the TF Serving export.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras
import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, DataType, Map, Schema

from engine.client import IMAGE_COLUMN, encode_file  # noqa: F401 (encode_file: doc/serving.md)
from engine.decoding import decode_files
from engine.network import class_probabilities

NETWORK_ARTIFACT = "network"
# What the model needs besides the project's code; pinned to the versions it was logged with.
REQUIREMENTS = ("mlflow", "tensorflow", "keras", "numpy", "pandas", "pillow")


def file_bytes(value: Any) -> bytes:
    """One request value -> the image file's bytes: base64 text (a data: URL too) or bytes.

    Raises:
        ValueError: the value is neither bytes nor base64 text.
    """
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a base64-encoded image file, got {type(value).__name__}")
    text = value.strip()
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]  # data:image/png;base64,....
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"not base64 ({err})") from err


def request_values(model_input: Any) -> list:
    """The images of a request: column `image` of a DataFrame, a dict, or a plain list."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            return list(model_input[IMAGE_COLUMN])
        if len(model_input.columns) == 1:
            return list(model_input.iloc[:, 0])
        raise ValueError(
            f"the request has columns {list(model_input.columns)}; send the base64 image "
            f"files in a column named '{IMAGE_COLUMN}'"
        )
    if isinstance(model_input, dict):
        if IMAGE_COLUMN not in model_input:
            raise ValueError(f"send the base64 image files under '{IMAGE_COLUMN}'")
        model_input = model_input[IMAGE_COLUMN]
    if isinstance(model_input, str | bytes):
        return [model_input]
    return list(np.asarray(model_input, dtype=object).ravel())


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Encoded image files -> predicted class, its probability, every class's probability."""

    def __init__(
        self, class_names: list[str], image_size: int, channels: int, batch_size: int = 32
    ):
        self.class_names = [str(c) for c in class_names]
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.batch_size = int(batch_size)
        self.network = None  # the Keras model; set by load_context or with_network
        self._forward = None  # the network as one tf.function for any batch size

    def __getstate__(self) -> dict:
        # pickled with the logged model: the network travels as its own artifact
        return {**self.__dict__, "network": None, "_forward": None}

    def load_context(self, context) -> None:
        self.network = keras.saving.load_model(context.artifacts[NETWORK_ARTIFACT], compile=False)

    def with_network(self, network) -> ImageClassifier:
        self.network = network
        return self

    def forward(self, images) -> np.ndarray:
        """The network's outputs for a batch of pixels, traced once for every batch size."""
        if self._forward is None:
            shape = (None, self.image_size, self.image_size, self.channels)
            self._forward = tf.function(
                lambda x: self.network(x, training=False),
                input_signature=[tf.TensorSpec(shape, tf.float32)],
            )
        return np.asarray(self._forward(images))

    def predict(self, context, model_input, params=None):
        """A request (see request_values) -> a DataFrame with one answer row per image."""
        return self.classify(request_values(model_input))

    def classify(self, values: list) -> Any:
        """Base64 texts or file bytes -> DataFrame of class, probability, probabilities, error."""
        errors: list[str | None] = [None] * len(values)
        probs = np.zeros((len(values), len(self.class_names)))
        with tempfile.TemporaryDirectory(prefix="classify-") as tmp:
            paths: dict[int, str] = {}
            for i, value in enumerate(values):
                try:
                    path = Path(tmp) / str(i)
                    path.write_bytes(file_bytes(value))
                    paths[i] = str(path)
                except ValueError as err:
                    errors[i] = str(err)
            # training's decoder, which is also its check that a file is an image
            images, failures = decode_files(list(paths.values()), self.image_size, self.channels)
        rows_of = list(paths)
        for j, why in failures.items():
            errors[rows_of[j]] = f"not a readable image file (PNG, JPEG, BMP, GIF or WebP): {why}"
        decoded = [j for j in range(len(rows_of)) if j not in failures]
        for start in range(0, len(decoded), self.batch_size):
            chunk = decoded[start : start + self.batch_size]
            outputs = self.forward(images[chunk].astype(np.float32))
            probs[[rows_of[j] for j in chunk]] = class_probabilities(outputs)
        rows = []
        for i, error in enumerate(errors):
            if error is not None:
                rows.append(
                    {"class": None, "probability": None, "probabilities": None, "error": error}
                )
                continue
            k = int(probs[i].argmax())
            probabilities = dict(zip(self.class_names, map(float, probs[i]), strict=True))
            rows.append(
                {
                    "class": self.class_names[k],
                    "probability": float(probs[i, k]),
                    "probabilities": probabilities,
                    "error": None,
                }
            )
        columns = ["class", "probability", "probabilities", "error"]
        return pd.DataFrame(rows, columns=columns, dtype=object)


def signature():
    """Input: a string column `image` (base64 image files); output: one answer per image."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "class", required=False),
                ColSpec(DataType.double, "probability", required=False),
                ColSpec(Map(DataType.double), "probabilities", required=False),
                ColSpec(DataType.string, "error", required=False),
            ]
        ),
    )


def png_base64(pixels: np.ndarray) -> str:
    """One image (H, W, C) of pixel values 0..255 as base64 PNG text."""
    png = tf.io.encode_png(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return base64.b64encode(png.numpy()).decode("ascii")


def pip_requirements() -> list[str]:
    """The packages the served model imports, at this environment's versions."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def log_classifier(
    network,
    example: np.ndarray,
    class_names: list[str],
    registered_model_name: str | None,
) -> Any:
    """Log `network` as an ImageClassifier pyfunc model named `model`; register it.

    Args:
        network: the Keras model (raw pixels in, probabilities out).
        example: a batch of input pixels; its first image becomes the input example.
        class_names: the names of the network's classes, in index order.

    Returns:
        mlflow's ModelInfo.
    """
    image_size, channels = int(example.shape[1]), int(example.shape[3])
    metadata = {
        "class_names": list(class_names),
        "image_size": image_size,
        "channels": channels,
        "output_units": int(network.output_shape[-1]),
        "input": f"column '{IMAGE_COLUMN}': base64-encoded PNG/JPEG/BMP/GIF/WebP files",
    }
    engine_dir = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        network_file = Path(tmp) / "network.keras"
        network.save(network_file)
        code = Path(tmp) / "code" / engine_dir.name
        shutil.copytree(engine_dir, code, ignore=shutil.ignore_patterns("__pycache__"))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=ImageClassifier(class_names, image_size, channels),
            artifacts={NETWORK_ARTIFACT: str(network_file)},
            code_paths=[str(code)],
            signature=signature(),
            input_example=pd.DataFrame({IMAGE_COLUMN: [png_base64(example[0])]}),
            pip_requirements=pip_requirements(),
            metadata=metadata,
            registered_model_name=registered_model_name or None,
        )


def load_classifier(uri: str) -> ImageClassifier:
    """The ImageClassifier behind a model URI, network loaded, for use in this process.

    A model logged before image input (the Keras network alone, `tensorflow` flavor) is
    wrapped with its metadata, so it answers the same way.
    """
    info = mlflow.models.get_model_info(uri)
    if "tensorflow" in info.flavors:
        metadata = info.metadata or {}
        classifier = ImageClassifier(
            metadata["class_names"], metadata["image_size"], metadata["channels"]
        )
        return classifier.with_network(mlflow.tensorflow.load_model(uri))
    return mlflow.pyfunc.load_model(uri).unwrap_python_model()


def load_network(uri: str):
    """The raw-pixel Keras network behind a model URI (either kind of logged model)."""
    return load_classifier(uri).network
