"""Train this project in its Docker image through MLflow Projects: the host's command line.

Usage:
    python project_driver.py run -P epochs=3          # one run (make run ARGS="-P epochs=3")
    python project_driver.py run --git-url URL --version SHA -P epochs=3   # a version from git
    RETRIES=2 python project_driver.py run -P epochs=30   # a failed run is resumed, twice at most
    ./project_driver.bash -P epochs=3                 # one run, its `mlflow run` in plain bash
    python project_driver.py plan -P epochs=3         # prepare a run, print its mlflow command
    python project_driver.py check                    # does the tracking server answer?
    python project_driver.py build                    # the image for the code here (make build)
    python project_driver.py sweep -P epochs=1,2 -P learning_rate=0.001,0.01
    python project_driver.py sweep --grid sweep.yaml --parallel 2 --experiment-name lr-sweep
    python project_driver.py tune --trials 20 --workers 4 --epochs 8   # make tune-docker

Before anything starts, the driver checks the tracking server, builds the image for the
code it runs (seconds when only code changed), and decides the docker args, saying in
one line each: GPU, tracking, user, storage, artifacts (host/plan.py, doc/docker.md).
Nothing else from the host is mounted: no home folder, no ~/.pgpass, no keys.
Settings (environment): MLFLOW_TRACKING_URI, GPUS (auto|none|all|device=N),
DOCKER_NETWORK (auto|host|bridge), STORAGE_DIR (/storage), BASE_IMAGE, RETRIES (0),
MLFLOW (the mlflow command; default: the one beside this Python).

This file only parses: each command is one function of the host package (host/), and
a user's mistake exits 2 with one paragraph, no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.common import PROJECT_DIR
from engine.config import UserError
from host import run, sweep, tune
from host.image import build_image
from host.plan import host_plan

# Commands whose options after the name go on as they are: to `mlflow run`, or to
# engine.tune (argparse would reject them).
PASSED_ON = {
    "run": "one run in the image through the launcher, tried again up to RETRIES times; "
    "--git-url URL --version V pick a version from git, the mlflow run options that "
    "follow are passed on (`mlflow run --help` lists them)",
    "plan": "check the server, build the image, prepare a run and print its mlflow command "
    "(--print0: as NUL-separated data for project_driver.bash; decisions on stderr)",
    "tune": "python -m engine.tune with each worker a container on its own GPU; the tune "
    "and train flags that follow are passed on (`python -m engine.tune train --help`)",
}


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per host function."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in PASSED_ON.items():
        commands.add_parser(name, help=text, description=text)
    commands.add_parser(
        "check", help="only check that the tracking server answers (make run does, before building)"
    )
    build = commands.add_parser("build", help="build the image for the code in a folder")
    build.add_argument("--project-dir", type=Path, default=PROJECT_DIR)
    build.add_argument("--base-image", default=os.environ.get("BASE_IMAGE", ""))
    sweep_command = commands.add_parser(
        "sweep", help="run a grid of parameter values, several at once"
    )
    sweep_command.add_argument("-P", "--param", action="append", default=[], metavar="NAME=V1,V2")
    sweep_command.add_argument("--grid", type=Path, help="YAML file of parameter values")
    sweep_command.add_argument(
        "--parallel", type=int, default=0, help="runs at once (default: GPUs, or 2 on the CPU)"
    )
    sweep_command.add_argument(
        "--experiment-name", default=os.environ.get("MLFLOW_EXPERIMENT_NAME")
    )
    sweep_command.add_argument("--git-url", default="", help="sweep a version from this repository")
    sweep_command.add_argument("--version", default="", help="the commit, branch or tag to sweep")
    sweep_command.add_argument(
        "--retries",
        type=int,
        help="try a failed run again up to this many times, resuming it from its checkpoint "
        "(default: RETRIES, else 0)",
    )
    return parser


def dispatch(args: argparse.Namespace, rest: list[str], base_image: str) -> int:
    """Run one command; `rest` holds the options a PASSED_ON command passes on."""
    if args.command == "run":
        return run.run_main(rest, run.retries_setting(os.environ.get("RETRIES")), base_image)
    if args.command == "plan":
        print0 = rest[:1] == ["--print0"]
        return run.plan_main(rest[1:] if print0 else rest, print0, base_image)
    if args.command == "tune":
        return tune.tune_main(["train", *rest], base_image)
    if args.command == "check":
        host_plan()
        return 0
    if args.command == "build":
        print(build_image(args.project_dir, args.base_image)["line"])
        return 0
    retries = args.retries
    if retries is None:
        retries = run.retries_setting(os.environ.get("RETRIES"))
    return sweep.sweep_main(
        args.param,
        args.grid,
        parallel=args.parallel,
        experiment_name=args.experiment_name,
        git_url=args.git_url,
        version=args.version,
        retries=retries,
        base_image=base_image,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run one command, turn a user error into exit 2 with its message."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on = argv[:1] and argv[0] in PASSED_ON and argv[1:2] not in (["-h"], ["--help"])
    args = build_parser().parse_args(argv[:1] if passed_on else argv)
    try:
        return dispatch(args, argv[1:] if passed_on else [], os.environ.get("BASE_IMAGE", ""))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
