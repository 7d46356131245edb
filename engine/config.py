"""The engine's knobs, and command-line flags made from any Config dataclass.

A fork's `Config` subclasses RunConfig and adds the knobs of its own data and
network. Every field is declared once, with its help text, and becomes a typed
flag (`--kebab-case` and `--snake_case`) and an MLproject parameter.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from typing import Any

from engine.memory import parse_size

# The compute dtypes mixed_precision accepts; true/false are the older spellings of
# auto/float32.
PRECISIONS = ("auto", "bfloat16", "float16", "float32", "true", "false")
# The metrics that can pick the best epoch, and whether lower is better.
MONITORS = {
    "val_loss": "min",
    "val_accuracy": "max",
    "val_auc": "max",
    "val_precision": "max",
    "val_recall": "max",
}


class UserError(Exception):
    """A problem the user can fix (bad parameter, missing data, unreachable server).

    The command lines print its message without a traceback and exit with status 2.
    """


def knob(default: Any, help_text: str) -> Any:
    """A Config field with its help text (shown by --help)."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class RunConfig:
    """The knobs the engine itself reads: data handling, the training loop, tracking.

    Redeclare a field in a subclass to change its default.
    """

    # data handling (any source)
    image_size: int = knob(128, "images are resized to image_size x image_size")
    channels: int = knob(3, "1 (grayscale) or 3 (RGB); images are converted to this")
    val_split: float = knob(0.2, "fraction of the data held out for validation (picks the epoch)")
    test_split: float = knob(
        0.1, "fraction held out for the final test, which no choice is made on (0 = none)"
    )
    training_samples: int = knob(0, "use at most this many training images (0 = all)")
    validation_samples: int = knob(0, "use at most this many validation images (0 = all)")
    cache: bool = knob(
        True, "read and write decoded images in the shared cache at cache_dir (false: decode anew)"
    )
    cache_dir: str = knob(
        "",
        "the decoded-image cache every run shares (default /storage/cache when /storage is "
        "writable, else ./.cache/images)",
    )
    memory_budget: str = knob(
        "auto",
        "memory the decoded images may take: held in memory when they fit, else streamed "
        "from the disk cache; a size (4G, 512M, 2GiB), 0 (always stream) or auto (half of "
        "what the machine or the container's memory limit leaves)",
    )
    follow_links_out: bool = knob(
        False, "imagedir: follow links that lead out of a class folder (by default skipped)"
    )
    group_column: str = knob(
        "",
        "dataframe: a column of group ids (patient, slide, video); a group's images never "
        "straddle train/val/test ('' = none; near duplicates are always kept together)",
    )
    data_check: str = knob(
        "warn",
        "check the decoded images for exact and near duplicates, label conflicts, class "
        "balance and blank images before training: warn (print a line, train), strict "
        "(refuse while label conflicts or duplicates across splits remain) or off",
    )
    class_weight: str = knob(
        "none", "none, or balanced: weight each class's loss by 1 / its share of training images"
    )
    # training loop
    epochs: int = knob(5, "passes over the training data")
    batch_size: int = knob(32, "images per batch on each device")
    learning_rate: float = knob(1e-3, "Adam learning rate (when define_network does not compile)")
    lr_schedule: str = knob(
        "cosine", "cosine: decay the learning rate to 0 over the epochs; constant: keep it"
    )
    monitor: str = knob(
        "val_loss", "metric that picks the best epoch, whose weights are logged and registered"
    )
    early_stopping_patience: int = knob(
        0, "stop after this many epochs without a better monitored value (0 = never)"
    )
    seed: int = knob(42, "seeds Python, NumPy, TensorFlow and the data split")
    deterministic: bool = knob(
        False,
        "true: TensorFlow's op determinism and a fixed input order, so the same machine gives "
        "the same figures twice (`make reproduce` says `exact`); slower, most on a GPU",
    )
    mixed_precision: str = knob(
        "auto",
        "compute dtype: auto (bfloat16 on compute capability >= 8.0, float16 on older GPUs, "
        "float32 on the CPU), bfloat16, float16 or float32",
    )
    xla: bool = knob(False, "compile the training step with XLA")
    distribute: str = knob(
        "true",
        "true: train on all visible GPUs with MirroredStrategy; false: on one device; "
        "multiworker: over the workers TF_CONFIG names (MultiWorkerMirroredStrategy, also "
        "chosen when TF_CONFIG names several workers); learning_rate is per global batch",
    )
    # crash recovery
    checkpoint_dir: str = knob(
        "",
        "checkpoints, one sub-folder per run (default /storage/checkpoints when /storage "
        "is writable, else ./checkpoints)",
    )
    resume_run_id: str = knob("", "resume this crashed run from its last checkpoint")
    keep_checkpoints: bool = knob(False, "keep the run's checkpoint folder after it finishes")
    # tracking
    experiment_name: str = knob("image-classifier", "MLflow experiment (ignored under mlflow run)")
    run_name: str = knob("", "MLflow run name (default: the network's name and the data source)")
    registered_model_name: str = knob(
        "image-classifier", "register the model under this name ('' = do not register)"
    )
    allow_class_change: bool = knob(
        False,
        "add a version to the registered model even when its latest version was trained "
        "on other classes (by default refused before training: a fork names its own model)",
    )
    model_alias: str = knob("candidate", "alias given to the new model version")
    export_savedmodel: bool = knob(True, "also log a TensorFlow Serving SavedModel")
    system_metrics: bool = knob(
        True, "log CPU, memory, disk, network and GPU use as system/... metrics"
    )

    def validate(self) -> None:
        """Raise UserError naming the first bad value and what would be accepted.

        A subclass extends this for its own knobs and calls super().validate().
        """
        checks = [
            (self.epochs >= 1, f"epochs must be a positive integer, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be a positive integer, got {self.batch_size}"),
            (self.image_size >= 8, f"image_size must be at least 8 pixels, got {self.image_size}"),
            (self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}"),
            (0 < self.val_split < 1, f"val_split must be between 0 and 1, got {self.val_split}"),
            (0 <= self.test_split < 1 and self.val_split + self.test_split < 1,
             f"test_split must be in [0, 1) and leave training data beside val_split, got "
             f"val_split {self.val_split} + test_split {self.test_split}"),
            (self.data_check in ("warn", "strict", "off"),
             f"data_check must be warn, strict or off, got '{self.data_check}'"),
            (self.class_weight in ("none", "balanced"),
             f"class_weight must be none or balanced, got '{self.class_weight}'"),
            (self.training_samples >= 0 and self.validation_samples >= 0,
             "training_samples and validation_samples must be 0 (all) or positive"),
            (self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}"),
            (self.mixed_precision in PRECISIONS,
             f"mixed_precision must be one of {', '.join(PRECISIONS)}, "
             f"got '{self.mixed_precision}'"),
            (self.lr_schedule in ("cosine", "constant"),
             f"lr_schedule must be cosine or constant, got '{self.lr_schedule}'"),
            (self.monitor in MONITORS,
             f"monitor must be one of {', '.join(MONITORS)}, got '{self.monitor}'"),
            (self.distribute_mode() != "",
             f"distribute must be true, false or multiworker, got '{self.distribute}'"),
            (self.early_stopping_patience >= 0,
             "early_stopping_patience must be 0 (off) or a positive number of epochs"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        try:
            parse_size(self.memory_budget)
        except ValueError as err:
            raise UserError(str(err)) from None

    def distribute_mode(self) -> str:
        """ "true", "false" or "multiworker" ("" for anything else); a resumed run's config
        from before multiworker may hold a bool."""
        value = str(self.distribute).strip().lower()
        if value == "multiworker":
            return value
        try:
            return "true" if parse_bool(value) else "false"
        except argparse.ArgumentTypeError:
            return ""


# ----------------------------------------------------------------------------
# Flags: one typed flag per field
# ----------------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    """true/false, yes/no, 1/0, on/off (any case) -> bool; anything else is an error."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, yes/no or 1/0, got '{text}'")


_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": parse_bool}


def field_type(f: dataclasses.Field) -> str:
    """A Config field's type name: int, float, str or bool."""
    name = f.type if isinstance(f.type, str) else f.type.__name__
    if name not in _FIELD_TYPES:
        raise TypeError(f"Config field {f.name} has type {name}; use int, float, str or bool")
    return name


def add_config_flags(
    parser: argparse.ArgumentParser, config_cls: type, names: Collection[str] | None = None
) -> None:
    """Add a typed flag for each field of config_cls (or those in `names`), with help and default.

    Both spellings are accepted: --data-source, and --data_source, which is what
    `mlflow run -P name=value` passes for a parameter its entry point does not declare.
    """
    for f in fields(config_cls):
        if names is not None and f.name not in names:
            continue
        kind = field_type(f)
        spellings = dict.fromkeys(["--" + f.name.replace("_", "-"), "--" + f.name])
        parser.add_argument(
            *spellings,
            dest=f.name,
            type=_FIELD_TYPES[kind],
            default=f.default,
            metavar=kind.upper(),
            help=f.metadata.get("help", ""),
        )


def build_parser(config_cls: type, description: str = "") -> argparse.ArgumentParser:
    """An argument parser with one flag per Config field, defaults shown in --help."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_config_flags(parser, config_cls)
    return parser


def parse_config(config_cls: type, argv: list[str] | None = None, description: str = "") -> Any:
    """Command-line flags -> a config_cls instance (argparse exits on a bad type)."""
    return config_cls(**vars(build_parser(config_cls, description).parse_args(argv)))


def config_from(config_cls: type, values: dict[str, Any]) -> Any:
    """A config_cls with its defaults, overridden by those of `values` that it has."""
    names = {f.name for f in fields(config_cls)}
    return config_cls(**{k: v for k, v in values.items() if k in names})
