"""Which model: a reference the user typed, resolved to one registered version, what that
version takes as input, and its Keras network.

A model is named by models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a
local path, or just an alias or version number of a registered model name.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
from mlflow.exceptions import MlflowException

from engine import serving
from engine.config import RunConfig, UserError

# The registered model a bare alias or version refers to, unless the caller names another
# (lifecycle.py passes train.Config's, which a fork may change).
DEFAULT_MODEL_NAME = RunConfig().registered_model_name


@dataclass
class ModelRef:
    """A model the user named, resolved against the registry."""

    uri: str  # what MLflow loads: models:/NAME/VERSION or runs:/...
    name: str | None  # registered model name (None for runs:/ URIs)
    version: str | None  # registered version number
    run_id: str | None  # the training run that logged it

    def __str__(self) -> str:
        return f"{self.name} version {self.version}" if self.name else self.uri


def _parse_reference(text: str, default_name: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS, models:/NAME/VERSION, ALIAS or VERSION -> (name, alias, version)."""
    if text.startswith("models:/"):
        body = text.removeprefix("models:/")
        if "@" in body:
            name, alias = body.split("@", 1)
            return name, alias, None
        if "/" in body:
            name, version = body.rsplit("/", 1)
            return name, None, version
        raise UserError(
            f"'{text}' names no version: write models:/{body}@ALIAS or models:/{body}/N"
        )
    if text.isdigit():
        return default_name, None, text
    return default_name, text, None


def resolve_model(text: str, default_name: str = DEFAULT_MODEL_NAME) -> ModelRef:
    """Turn what the user typed into a ModelRef with a fixed version.

    Args:
        text: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/PATH, a local path,
            or a bare alias or version number of `default_name`.
        default_name: the registered model a bare alias or version refers to.

    Raises:
        UserError: the name, version or alias does not exist.
    """
    client = mlflow.MlflowClient()
    if (
        text.startswith(("runs:/", "models:/m-"))  # a run's artifact, or a logged model's id
        or "://" in text
        or Path(text).exists()
    ):
        run_id = text.split("/")[1] if text.startswith("runs:/") else None
        return ModelRef(uri=text, name=None, version=None, run_id=run_id)
    name, alias, version = _parse_reference(text, default_name)
    try:
        if alias is not None:
            model_version = client.get_model_version_by_alias(name, alias)
        else:
            model_version = client.get_model_version(name, version)
    except MlflowException as err:
        known = known_versions(client, name)
        what = f"alias '{alias}'" if alias is not None else f"version {version}"
        raise UserError(
            f"registered model '{name}' has no {what} in {mlflow.get_tracking_uri()}. "
            f"{known} {_how_to_get(known, alias)}"
        ) from err
    return ModelRef(
        uri=f"models:/{name}/{model_version.version}",
        name=name,
        version=str(model_version.version),
        run_id=model_version.run_id,
    )


def _how_to_get(known: str, alias: str | None) -> str:
    """The fix for a missing version or alias: a champion comes from `make validate`."""
    if alias == "champion" and "There is no registered model" not in known:
        return (
            "A version becomes champion when `make validate` (lifecycle.py validate) "
            "finds it better than the current one: run that first, or name a version "
            "with --model (e.g. MODEL=models:/NAME@candidate)."
        )
    return "Train one (python train.py ...), or name another with --model."


def known_versions(client: mlflow.MlflowClient, name: str) -> str:
    """A sentence naming the versions and aliases a registered model has (for errors)."""
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


def load_model(uri: str) -> keras.Model:
    """The raw-pixel Keras network behind an MLflow model URI (for evaluation and export)."""
    return serving.load_network(uri)
