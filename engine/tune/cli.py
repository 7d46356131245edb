"""`python -m engine.tune`: its flags, the checks before anything runs, and main().

Light at import (no MLflow, TensorFlow or Keras): the host imports it through
`from engine import tune`, and `--help` answers before anything heavy loads. main()
imports the coordinator, or a worker, once it runs one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from engine.cli import quiet_tensorflow
from engine.config import MONITORS, UserError, add_config_flags, build_parser
from engine.tune.settings import (
    DIRECTIONS,
    PRUNERS,
    Launcher,
    TuneSettings,
    default_storage,
    load_hooks,
)
from engine.tune.space import check_space, load_space
from engine.tune.study import open_storage


def tune_parser() -> argparse.ArgumentParser:
    """Tune's own flags; every flag it does not know is a train flag."""
    parser = argparse.ArgumentParser(
        prog="python -m engine.tune",
        description="Search hyperparameters with Optuna (doc/tuning.md). Every other flag "
        "is a train flag (python train.py --help lists them) given to each trial.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    flag = parser.add_argument
    flag("hooks", help="module with Config, load_data, define_network")
    flag("--trials", type=int, default=20, help="trials to run in this call")
    flag("--workers", type=int, default=1, help="trials trained at once")
    flag(
        "--timeout",
        type=float,
        default=0,
        help="seconds after which no trial starts (running ones finish); 0 = none",
    )
    flag(
        "--metric",
        default="",
        help=f"metric to optimise: one of {', '.join(MONITORS)} (default: the Config's monitor)",
    )
    flag(
        "--direction",
        default="",
        choices=["", "minimize", "maximize"],
        help="default: the metric's natural direction",
    )
    flag(
        "--study-name",
        default="",
        help="continue this study, or name a new one (default: EXPERIMENT-tune-DATE-TIME)",
    )
    flag(
        "--storage",
        default="",
        help="journal file path or postgresql:// URL "
        "(default /storage/tune/studies.journal, else ./.tune/)",
    )
    flag("--space", default="tune.yaml", help="search space file ('' = none)")
    flag(
        "--param",
        action="append",
        default=[],
        metavar="NAME=RANGE",
        help="search NAME: LOW:HIGH, LOW:HIGH:log or A,B,C",
    )
    flag("--pruner", default="median", choices=PRUNERS)
    flag(
        "--prune-after",
        type=int,
        default=0,
        help="epochs a trial trains before it can be pruned (default: --epochs // 3, at least 1)",
    )
    return parser


def given_train_flags(config_cls: type, argv: list[str]) -> tuple[Any, set[str]]:
    """Parse the train flags: (the Config, the names given explicitly)."""
    parser = build_parser(config_cls, "train flags passed to every trial")
    parser.prog = "python -m engine.tune HOOKS [tune flags]"
    cfg = parser.parse_args(argv)
    unset = object()  # not a string, so argparse does not convert it
    explicit = argparse.ArgumentParser(add_help=False)
    add_config_flags(explicit, config_cls)
    explicit.set_defaults(**{f.name: unset for f in dataclasses.fields(config_cls)})
    given = {k for k, v in vars(explicit.parse_known_args(argv)[0]).items() if v is not unset}
    return config_cls(**vars(cfg)), given


def tuned_metric(args: argparse.Namespace, base: Any) -> tuple[str, str]:
    """(the metric to optimise, its direction), checked."""
    metric = args.metric or base.monitor
    if metric not in MONITORS:
        raise UserError(
            f"--metric '{metric}' is unknown; tune can optimise one of {', '.join(MONITORS)} "
            "(the metrics every epoch reports). Nothing was trained."
        )
    return metric, args.direction or DIRECTIONS[MONITORS[metric]]


def prepare(argv: list[str]) -> tuple[TuneSettings, int, int]:
    """Parse and check everything; nothing is trained and no run exists yet.

    Returns:
        (the settings, less parent run and stop_at; workers; trials).
    """
    args, rest = tune_parser().parse_known_args(argv)
    config_cls, _, _ = load_hooks(args.hooks)
    base, given = given_train_flags(config_cls, rest)
    if args.trials < 1 or args.workers < 1 or args.prune_after < 0:
        raise UserError("--trials and --workers must be positive, --prune-after 0 or more")
    metric, direction = tuned_metric(args, base)
    # The trials' best epoch is picked by the tuned metric, so a trial's value is its best.
    base = dataclasses.replace(base, monitor=metric, resume_run_id="")
    base.validate()
    space_file = Path(args.space) if args.space else None  # --space '': only --param
    if args.space not in ("", "tune.yaml") and not space_file.exists():
        raise UserError(f"--space {space_file} does not exist")
    space = load_space(space_file, args.param, config_cls, given - {"monitor"})
    check_space(space, base)
    storage = args.storage or default_storage()
    open_storage(storage)  # reachable, before any run exists
    stamp = time.strftime("%Y%m%d-%H%M%S")
    settings = TuneSettings(
        hooks=args.hooks,
        study_name=args.study_name or f"{base.experiment_name}-tune-{stamp}",
        storage=storage,
        metric=metric,
        direction=direction,
        pruner=args.pruner,
        base=dataclasses.asdict(base),
        space=[dataclasses.asdict(p) for p in space],
        parent_run_id="",
        stop_at=0,
        deadline=time.time() + args.timeout if args.timeout > 0 else 0.0,
        seed=base.seed,
        # early epochs are noisy (a high learning rate starts badly): wait a third of them
        prune_after=args.prune_after or max(1, base.epochs // 3),
    )
    return settings, args.workers, args.trials


def main(argv: list[str] | None = None, launcher: Launcher | None = None) -> int:
    """Run a study (or, as `worker FILE N`, one worker of it).

    Args:
        argv: the hooks module, tune flags and train flags (default: sys.argv[1:]).
        launcher: how workers start (a Launcher, engine.tune.settings): LocalWorkers
            by default; the host's `make tune-docker` passes DockerWorkers.

    Returns:
        0 when the study ran, 2 for a problem the user can fix (message, no traceback),
        1 when a worker failed, 130 or 128 + signal when Ctrl-C or SIGTERM stopped it.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if argv[:1] == ["worker"]:
        quiet_tensorflow()
        # here, not at the top: a worker trains, so it imports TensorFlow and Keras
        from engine.tune.worker import worker_main

        return worker_main(argv[1], int(argv[2]))
    try:
        settings, workers, trials = prepare(argv)
        quiet_tensorflow()
        # here, not at the top: the coordinator imports MLflow and TensorFlow, which
        # `--help` and the host's `from engine import tune` must not wait for
        from engine.tune.coordinator import open_study, run_study

        study, launcher, tracking_uri = open_study(settings, launcher)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run_study(study, settings, launcher, workers, trials, tracking_uri)
