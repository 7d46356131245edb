"""load_data's contract, checked before any MLflow run exists.

load_data(cfg) returns (train_ds, val_ds, info); `check_data` checks that value
and says what was expected (`DATA_CONTRACT`) when it is not so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from engine.config import UserError
from engine.images import DataInfo

LoadData = Callable[[Any], tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]]

DATA_CONTRACT = (
    "load_data(cfg) must return (train_ds, val_ds, info): two batched tf.data.Datasets of "
    "(images (batch, H, W, C) float32 or uint8 pixel values 0..255, labels (batch,) integer "
    "class indices) and an engine.images.DataInfo (its test_ds, optional, batched alike); "
    "the engine's files_pipeline and arrays_pipeline build all of them."
)


def check_data(result: Any) -> tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]:
    """load_data's return value, checked against its contract before any run starts.

    Raises:
        UserError: naming the value that breaks the contract, and the contract.
    """
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
        check_dataset(name, ds, info)
    return train_ds, val_ds, info


def check_dataset(name: str, ds: Any, info: DataInfo) -> None:
    """One of load_data's datasets: (images, labels) batches of info.image_shape."""
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
            f"{', '.join(map(str, info.image_shape))}) as info.image_shape says. " + DATA_CONTRACT
        )
    if not (images.dtype.is_floating or images.dtype == tf.uint8):
        raise UserError(f"{name} yields {images.dtype.name} images. {DATA_CONTRACT}")
    if not labels.dtype.is_integer or labels.shape.rank != 1:
        raise UserError(
            f"{name} yields labels of {labels.dtype.name} {tuple(labels.shape)}; expected "
            f"integer class indices of shape (batch,). {DATA_CONTRACT}"
        )
