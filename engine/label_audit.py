"""`lifecycle.py label-audit` (`make label-audit`): its flags, and the door to the audit.

Likely label errors among the training images, by K-fold (engine.label_audit_run does
the work). This module stays light, because lifecycle.py builds its parser for --help:
TensorFlow is imported only when the audit runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.config import add_config_flags, config_from

NAME = "label-audit"
HELP = "likely label errors among the training images, by K-fold"


def add_parser(commands: Any, data_config: type) -> argparse.ArgumentParser:
    """The label-audit subcommand: its own flags, then every knob of data_config but epochs.

    Args:
        commands: the subparsers of lifecycle.py's parser.
        data_config: the fork's Config (train.Config).
    """
    formatter = argparse.ArgumentDefaultsHelpFormatter
    command = commands.add_parser(NAME, help=HELP, formatter_class=formatter)
    command.add_argument(
        "--folds",
        type=int,
        default=5,
        help="K: each fold is predicted by a "
        "network trained on the others (fewer when a class has fewer images)",
    )
    command.add_argument("--epochs", type=int, default=3, help="epochs each fold's network trains")
    command.add_argument(
        "--output",
        default="outputs/label_audit",
        help="folder for label_audit.csv and label_audit.json",
    )
    command.add_argument("--top", type=int, default=10, help="how many entries to print")
    knobs = {f.name for f in dataclasses.fields(data_config)} - {"epochs"}
    add_config_flags(command, data_config, knobs)
    return command


def run(
    args: argparse.Namespace, data_config: type, load_data: Callable, define_network: Callable
) -> list[dict]:
    """Run the audit with the parsed flags and the fork's hooks; returns the ranked entries."""
    # here, not at the top: the audit loads TensorFlow, which lifecycle's --help must not
    from engine import label_audit_run

    cfg = config_from(data_config, vars(args))
    return label_audit_run.audit(
        cfg, load_data, define_network, args.folds, Path(args.output), args.top
    )
