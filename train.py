"""Train a Keras image classifier and log everything to MLflow. This is the file to edit.

Three things live here, top to bottom, and they are yours:
    Config                                          every knob of your data and network
    load_data(cfg)                                  -> (train_ds, val_ds, info)
                                                       (info.test_ds: the test split)
    define_network(input_shape, num_classes, cfg)   -> keras.Model, compiled or not
The engine/ package does the rest (decoding, caching, tracking, plots, the training
loop, the flags) and never imports this file.

Usage:
    python train.py --help                      # every knob, its type and default
    python train.py --data-source demo --convolutions 3 --epochs 6
    python train.py --data-source imagedir --data-dir /storage/cells --epochs 10
    mlflow run . -P epochs=3                    # the MLproject `main` entry point

After adding or changing a knob in Config, run `make mlproject` (a test fails
while MLproject disagrees with Config).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine import RunConfig, UserError, knob
from engine import sources as src

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from engine.images import DataInfo

PROJECT_DIR = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------
# Config: every knob, declared once with its help text. Flags and MLproject's
# `main` come from it. The engine's own knobs (image_size, epochs, batch_size,
# learning_rate, seed, tracking names, ...) are inherited from engine.RunConfig:
# redeclare one here to change its default.
# ----------------------------------------------------------------------------


@dataclass
class Config(RunConfig):
    # data
    data_source: str = knob("tfds", "where images come from: a name in DATA_SOURCES below")
    dataset: str = knob("malaria", "TFDS dataset name (data_source=tfds)")
    data_dir: str = knob(
        "",
        "tfds: TFDS data folder (default /storage/tfdata); imagedir: folder with one "
        "sub-folder per class; dataframe: CSV/JSON table of paths and labels; arrays: "
        ".npz or .h5 file; demo: where the demo images are made (default ./data/demo)",
    )
    path_column: str = knob("path", "dataframe: the column holding image paths")
    label_column: str = knob("label", "dataframe: the column holding labels")
    split_column: str = knob(
        "split", "dataframe: a column naming each row's split (train/val/test), used if present"
    )
    demo_samples: int = knob(1000, "demo: how many synthetic images to make")
    # network
    convolutions: int = knob(0, "N >= 1: small CNN of N conv layers; 0: VGG16 transfer learning")
    weights: str = knob("imagenet", "VGG16 start weights: imagenet or none")
    fine_tune_layers: int = knob(0, "VGG16: unfreeze this many layers at the top of the base")
    dense_units: int = knob(128, "units in the dense layer before the output")
    dropout: float = knob(0.3, "dropout rate before the output layer")
    randomize_images: bool = knob(True, "augment training images (flips, rotation, zoom)")

    def validate(self) -> None:
        """Raise UserError naming the first bad value (the engine checks its own knobs)."""
        super().validate()
        checks = [
            (self.data_source in DATA_SOURCES,
             f"data_source '{self.data_source}' is unknown; use one of: "
             + ", ".join(DATA_SOURCES)),
            (self.convolutions >= 0,
             f"convolutions must be 0 (VGG16) or a positive number, got {self.convolutions}"),
            (self.weights in ("imagenet", "none"),
             f"weights must be 'imagenet' or 'none', got '{self.weights}'"),
            (self.fine_tune_layers >= 0, "fine_tune_layers must be 0 or positive"),
            (self.dense_units >= 1, "dense_units must be positive"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.demo_samples >= 4, "demo_samples must be at least 4"),
            (self.convolutions > 0 or self.image_size >= 32,
             f"VGG16 (convolutions=0) needs image_size >= 32, got {self.image_size}; "
             "raise image_size or use the small CNN (convolutions >= 1)"),
            (self.convolutions > 0 or self.weights == "none" or self.channels == 3,
             "VGG16 imagenet weights need channels=3 (RGB)"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise UserError(message)


# ----------------------------------------------------------------------------
# Data: load_data(cfg) -> (train_ds, val_ds, info)
#
# Each source is a function of the Config. To add one, write the function (end it
# in engine.images.files_pipeline(paths, labels, class_names, cfg) for image files,
# or arrays_pipeline(images, labels, class_names, cfg) for arrays in memory) and add
# its name to DATA_SOURCES. That is the only list of names.
# ----------------------------------------------------------------------------

DATA_SOURCES: dict[str, Callable[[Config], tuple]] = {
    "tfds": lambda cfg: src.load_tfds(cfg.dataset, cfg.data_dir, cfg),
    "imagedir": lambda cfg: src.load_imagedir(cfg.data_dir, cfg),
    "dataframe": lambda cfg: src.load_dataframe(
        cfg.data_dir, cfg, cfg.path_column, cfg.label_column, cfg.split_column
    ),
    "arrays": lambda cfg: src.load_arrays(cfg.data_dir, cfg),
    "demo": lambda cfg: src.load_demo(
        cfg.data_dir or PROJECT_DIR / "data" / "demo", cfg.demo_samples, cfg
    ),
}


def load_data(cfg: Config) -> tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]:
    """Load the training and validation data chosen by cfg.data_source.

    Returns:
        (train_ds, val_ds, info): batched tf.data pipelines of (images, labels): images
        (batch, H, W, C) with pixel values 0..255 (float32 or uint8) of shape
        info.image_shape, labels (batch,) int32 class indices, the training one
        shuffled; and an engine.images.DataInfo with class names and counts, whose
        test_ds (batched like val_ds, or None) is scored once when training ends.

    Raises:
        UserError: the data is missing, empty, or has fewer than two classes.
    """
    return DATA_SOURCES[cfg.data_source](cfg)


# ----------------------------------------------------------------------------
# Network: define_network(input_shape, num_classes, cfg) -> keras.Model
# ----------------------------------------------------------------------------


def define_network(input_shape: tuple[int, int, int], num_classes: int, cfg: Config) -> keras.Model:
    """Build the classifier. It takes raw pixels (0..255) and outputs class probabilities.

    The contract (the engine checks it before a run starts): the output is (batch, 1)
    sigmoid for two classes, or (batch, num_classes) softmax. Return the model
    compiled or not: the engine compiles an uncompiled one to fit its output (cross-
    entropy, Adam at cfg.learning_rate, accuracy/auc/precision/recall). The model
    rescales pixels itself, so whoever loads it from MLflow needs no preprocessing.

    Args:
        input_shape: (height, width, channels) of the images, from the data's info.
        num_classes: number of classes, from the data's info.
        cfg: convolutions (0 = VGG16), weights, fine_tune_layers, dense_units,
            dropout, randomize_images, seed.
    """
    import keras  # here, not at the top: `train.py --help` and lifecycle need no TensorFlow

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if cfg.randomize_images:  # active only while training
        x = keras.layers.RandomFlip("horizontal_and_vertical", seed=cfg.seed)(x)
        x = keras.layers.RandomRotation(0.1, seed=cfg.seed)(x)
        x = keras.layers.RandomZoom(0.1, seed=cfg.seed)(x)
    if cfg.convolutions == 0:
        base = keras.applications.VGG16(
            include_top=False,
            weights=None if cfg.weights == "none" else cfg.weights,
            input_shape=input_shape,
        )
        base.trainable = False
        for layer in base.layers[len(base.layers) - cfg.fine_tune_layers :]:
            layer.trainable = cfg.fine_tune_layers > 0
        x = base(keras.applications.vgg16.preprocess_input(x))
        name = "vgg16"
    else:
        x = keras.layers.Rescaling(1.0 / 255)(x)
        for i in range(cfg.convolutions):  # conv, batch norm, ReLU; halve the size
            x = keras.layers.Conv2D(min(32 * 2**i, 256), 3, padding="same", use_bias=False)(x)
            x = keras.layers.BatchNormalization(momentum=0.9)(x)  # settles in a few dozen steps
            x = keras.layers.ReLU()(x)
            if x.shape[1] >= 4:
                x = keras.layers.MaxPooling2D()(x)
        name = f"cnn{cfg.convolutions}"
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(cfg.dense_units, activation="relu")(x)
    x = keras.layers.Dropout(cfg.dropout)(x)
    binary = num_classes == 2
    outputs = keras.layers.Dense(
        1 if binary else num_classes,
        activation="sigmoid" if binary else "softmax",
        dtype="float32",  # a float32 output keeps the loss stable under mixed precision
        name="probabilities",
    )(x)
    return keras.Model(inputs, outputs, name=name)


# ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from engine import cli

    return cli.main(Config, load_data, define_network, argv, __doc__.split("\n")[0])


if __name__ == "__main__":
    sys.exit(main())
