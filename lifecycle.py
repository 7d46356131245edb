"""The model after training: validate, predict, serve, export, and tidy up runs.

Usage:
    python lifecycle.py validate --model models:/image-classifier@candidate --data-source demo
    python lifecycle.py predict --model models:/image-classifier@champion --input cells/
    python lifecycle.py serve --model models:/image-classifier@champion --port 5001
    python lifecycle.py request --url http://127.0.0.1:5001 cell.png other.jpg
    python lifecycle.py export --model models:/image-classifier@champion --output serving/cells
    python lifecycle.py reap-runs --stale-minutes 60
    python lifecycle.py reproduce --model models:/image-classifier@champion
    python lifecycle.py label-audit --data-source demo --folds 5
    mlflow run . -e validate -P model=models:/image-classifier@candidate

A model is named by models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model,
or just an alias or version number of --model-name (default image-classifier).

This file is the door: it parses the flags and calls one function of the engine
(registry, validation, prediction, client, reaping). From train.py it uses only the
public hooks, Config and load_data, and hands them to the engine. Importing it (and
train.py) loads neither TensorFlow nor MLflow, so --help and `request` answer at once.

Tracking goes to $MLFLOW_TRACKING_URI, or to the local store in this folder, as for
train.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import train  # the fork's Config (its model name and data knobs) and load_data; light
from engine import (
    label_audit,  # light: its parser; the audit loads TensorFlow when it runs
    reproduction_flags,
)
from engine.config import UserError, add_config_flags, config_from, parse_bool

MODEL_NAME = train.Config().registered_model_name
# validate's own flags; every other Config knob is a flag too, so a fork's own data
# source gets the knobs its load_data reads.
VALIDATE_OWN_FLAGS = ("experiment_name",)
# validate's keywords, its flags by the same names
VALIDATE_OPTIONS = (
    "split",
    "metric",
    "champion_alias",
    "min_delta",
    "experiment_name",
    "model_name",
    "promote",
    "require_reproduced",
)
METRICS = ["accuracy", "auc", "loss", "precision", "recall", "f1"]


def _model_flags(alias: str) -> list[tuple[str, dict]]:
    """--model (default models:/NAME@alias) and --model-name: which model a command uses."""
    model_help = (
        "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a bare alias or "
        "version number of --model-name"
    )
    name_help = "registered model a bare alias refers to"
    return [
        ("--model", {"default": f"models:/{MODEL_NAME}@{alias}", "help": model_help}),
        ("--model-name", {"default": MODEL_NAME, "help": name_help}),
    ]


# Each command: its one-line help and its own flags, (name, argparse keywords), in --help order.
COMMANDS = {
    "validate": ("evaluate a version; move `champion` if it wins", [*_model_flags("candidate"),
        ("--metric", dict(default="auc", choices=METRICS,
                          help="what decides; loss: lower is better, the others higher")),
        ("--champion-alias", dict(default="champion", help="alias of the model in use")),
        ("--min-delta", dict(type=float, default=0.0,
                             help="the candidate must beat the champion by more than this")),
        ("--split", dict(choices=["test", "validation", "all"], default="test",
                         help="test: the split train.py holds out with the same seed and "
                         "test_split, which no training choice saw; validation: the split that "
                         "picked the best epoch (optimistic); all: every image (a separate test "
                         "set)")),
        ("--experiment-name", dict(default="model-validation", help="experiment of the run")),
        ("--promote", dict(type=parse_bool, default=True, metavar="BOOL",
                           help="false: report the decision but leave the alias alone")),
        ("--require-reproduced", dict(action="store_true",
                                      help="refuse a version `make reproduce` did not reproduce")),
    ]),
    "predict": ("classify images; write a CSV", [*_model_flags("champion"),
        ("--input", dict(nargs="+", required=True, metavar="PATH",
                         help="image folders (searched recursively), image files, or CSV/JSON "
                         "tables with a path column")),
        ("--output", dict(default="outputs/predictions.csv", help="CSV to write")),
        ("--path-column", dict(default="path", help="tables: the column of image paths")),
        ("--batch-size", dict(type=int, default=64, help="images per prediction batch")),
    ]),
    "serve": ("REST endpoint: mlflow models serve", [*_model_flags("champion"),
        ("--host", dict(default="127.0.0.1", help="interface to listen on")),
        ("--port", dict(type=int, default=5001, help="port to listen on")),
    ]),
    "request": ("send image files to a served model; print classes", [
        ("--url", dict(default="http://127.0.0.1:5001", help="the served model")),
        ("--print-json", dict(action="store_true",
                              help="print the request body instead of sending it (for curl)")),
        ("images", dict(nargs="+", help="image files (PNG, JPEG, BMP, GIF, WebP)")),
    ]),
    "export": ("write a TF Serving SavedModel", [*_model_flags("champion"),
        ("--output", dict(default=f"outputs/serving/{MODEL_NAME}",
                          help="TF Serving model base path; the version folder goes inside")),
        ("--version", dict(type=int, default=1, help="version folder number")),
    ]),
    "reap-runs": ("mark RUNNING runs whose process died FAILED", [
        ("--experiment", dict(action="append", metavar="NAME",
                              help="limit to this experiment (repeatable; default all)")),
        ("--stale-minutes", dict(type=float, default=60,
                                 help="a run with nothing logged for this long counts as dead")),
        ("--dry-run", dict(action="store_true", help="only list what would be marked")),
    ]),
}  # fmt: skip


def build_parser(data_config: type = train.Config) -> argparse.ArgumentParser:
    """The command-line parser; validate gets a flag per field of data_config (train.Config)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    formatter = argparse.ArgumentDefaultsHelpFormatter
    for name, (help_text, flags) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text, formatter_class=formatter)
        for flag, options in flags:
            command.add_argument(flag, **options)
        if name == "validate":
            knobs = {f.name for f in dataclasses.fields(data_config)} - set(VALIDATE_OWN_FLAGS)
            add_config_flags(command, data_config, knobs)
    reproduce = commands.add_parser("reproduce", help=reproduction_flags.HELP)
    reproduction_flags.add_arguments(reproduce, MODEL_NAME)
    label_audit.add_parser(commands, data_config)
    return parser


def run(args: argparse.Namespace) -> None:
    """Run one parsed command with its engine module.

    Each branch imports its module when it runs: they import TensorFlow or MLflow, which
    `--help` and `request` must not wait for.
    """
    if args.command == "request":
        from engine import client

        client.request(args.url, args.images, args.print_json)
        return
    if args.command == "reap-runs":
        from engine import reaping

        reaping.reap_runs(args.experiment, args.stale_minutes, args.dry_run)
        return
    if args.command == "reproduce":  # it trains in a subprocess or the image: no TensorFlow
        from host.reproduce import reproduce

        reproduce(args)
        return
    from engine.cli import quiet_tensorflow

    quiet_tensorflow()  # the commands below load TensorFlow
    if args.command == "validate":
        from engine import validation

        options = {key: getattr(args, key) for key in VALIDATE_OPTIONS}
        data_cfg = config_from(train.Config, vars(args))
        validation.report(validation.validate(args.model, data_cfg, train.load_data, **options))
        return
    if args.command == label_audit.NAME:
        label_audit.run(args, train.Config, train.load_data, train.define_network)
        return
    from engine import prediction

    if args.command == "predict":
        prediction.predict(
            args.model, args.input, args.output, args.path_column, args.batch_size, args.model_name
        )
    elif args.command == "serve":
        prediction.serve(args.model, args.port, args.host, args.model_name)
    elif args.command == "export":
        prediction.export(args.model, args.output, args.version, args.model_name)


def main(argv: list[str] | None = None) -> int:
    """Parse argv, run the command; a UserError prints one paragraph and returns 2."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
