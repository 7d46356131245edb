"""`lifecycle.py reproduce`'s flags, apart from engine/reproduction.py so that --help
loads nothing heavy (that module imports MLflow)."""

from __future__ import annotations

import argparse

HELP = "train a registered model's run again from its record; say if the figures come back"


def add_arguments(parser: argparse.ArgumentParser, model_name: str) -> None:
    """reproduce's flags, on lifecycle.py's subcommand parser."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="models:/NAME@ALIAS or models:/NAME/VERSION")
    which.add_argument("--run", help="the id of the run to reproduce")
    parser.add_argument("--model-name", default=model_name, help="model a bare alias names")
    parser.add_argument(
        "--git-url", default="", help="repository holding the run's commit (default: this one)"
    )
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="reproduce a run made from uncommitted edits with its commit, without the edits",
    )
    parser.add_argument(
        "--allow-data-change",
        action="store_true",
        help="train on the data as it is now even when it differs from the recorded data",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.01,
        help="largest difference still `within`: absolute on accuracy-like figures (0..1), "
        "relative on the others (loss)",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="train with this parameter changed: only for checking the checker, whose "
        "verdict must then be `no`",
    )
