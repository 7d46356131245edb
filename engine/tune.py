"""`make tune`: an Optuna search whose workers pull trials, recorded as one MLflow parent run.

    python -m engine.tune train --trials 20 --workers 2 --epochs 8 --data-source demo

The first argument names the module holding Config, load_data and define_network
(the engine never imports train.py by itself). Tune's own flags come next; every
other flag is a train flag passed to each trial, and a train flag also pins that
parameter (it is then not searched). The search space is tune.yaml (see
engine/search_space.py), overridden by --param.

K worker processes each loop ask -> train -> tell until the study holds enough trials
or the time is up: a free worker takes the next trial at once (no batch barrier). Each
trial is one run_training run, an MLflow child run of the study's parent run; a pruning
callback reports the monitored metric every epoch and stops a bad trial, whose run ends
FINISHED with the tags tune.pruned=true and tune.pruned_epoch=N. Trials log their model
but do not register it; at the end the best trial's model is registered with the alias.
The study lives in a journal file (one machine) or a database URL (postgresql://...):
starting again with the same --study-name continues it.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from engine import search_space
from engine.common import storage_folder
from engine.config import MONITORS, UserError, add_config_flags, build_parser

DIRECTIONS = {"min": "minimize", "max": "maximize"}
PRUNERS = ("median", "hyperband", "none")
# A worker started as `python -m engine.tune worker - N` reads its settings from here.
SETTINGS_ENV = "TUNE_SETTINGS"


def default_storage() -> str:
    """A journal file under /storage/tune when /storage is writable, else ./.tune."""
    return str(storage_folder("tune", ".tune") / "studies.journal")


def safe_url(url: str) -> str:
    """The storage URL without its password, for logs and run parameters."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def open_storage(url: str, timeout: float = 5.0):
    """An Optuna storage for a database URL or a journal file path; checked to work.

    Raises:
        UserError: the database does not answer or refuses the login, or the file's
            folder cannot be written.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" not in url:
        path = Path(url)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise UserError(f"the study storage file {path} cannot be written ({err})") from err
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    kwargs: dict[str, Any] = {}
    if scheme == "postgresql":
        if "+" not in parts.scheme:  # psycopg (3) is what the template installs
            url = "postgresql+psycopg" + url[len(parts.scheme) :]
        kwargs = {"connect_args": {"connect_timeout": int(timeout)}}
    elif scheme not in ("sqlite", "mysql"):
        raise UserError(
            f"--storage '{safe_url(url)}' is neither a file path nor a postgresql://, "
            "mysql:// or sqlite:/// URL"
        )
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as err:  # sqlalchemy's OperationalError and its driver's errors
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"the study storage {safe_url(url)} is unreachable ({reason}). Start the "
            "database, fix --storage, or leave --storage out to use a journal file on "
            "this machine. No trial was started."
        ) from err


def load_hooks(module_name: str):
    """(Config, load_data, define_network) from the module the fork keeps them in."""
    module = importlib.import_module(module_name)
    return module.Config, module.load_data, module.define_network


# ----------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class TuneSettings:
    """Everything a worker needs, written to a JSON file each worker reads."""

    hooks: str
    study_name: str
    storage: str
    metric: str
    direction: str
    pruner: str
    base: dict[str, Any]  # the trials' Config values, searched ones aside
    space: list[dict[str, Any]]
    parent_run_id: str
    stop_at: int  # the study stops asking once it holds this many trials
    deadline: float  # time.time() after which no trial starts (0 = none)
    seed: int
    prune_after: int = 1  # epochs every trial trains before it can be pruned


def tune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine.tune",
        description="Search hyperparameters with Optuna (doc/tuning.md). Every other flag "
        "is a train flag (python train.py --help lists them) given to each trial.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("hooks", help="module with Config, load_data, define_network")
    parser.add_argument("--trials", type=int, default=20, help="trials to run in this call")
    parser.add_argument("--workers", type=int, default=1, help="trials trained at once")
    parser.add_argument("--timeout", type=float, default=0, help="seconds after which no "
                        "trial starts (running ones finish); 0 = none")  # fmt: skip
    parser.add_argument("--metric", default="", help="metric to optimise: one of "
                        f"{', '.join(MONITORS)} (default: the Config's monitor)")  # fmt: skip
    parser.add_argument("--direction", default="", choices=["", "minimize", "maximize"],
                        help="default: the metric's natural direction")  # fmt: skip
    parser.add_argument("--study-name", default="", help="continue this study, or name a "
                        "new one (default: EXPERIMENT-tune-DATE-TIME)")  # fmt: skip
    parser.add_argument("--storage", default="", help="journal file path or postgresql:// "
                        "URL (default /storage/tune/studies.journal, else ./.tune/)")  # fmt: skip
    parser.add_argument("--space", default="tune.yaml", help="search space file ('' = none)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=RANGE",
                        help="search NAME: LOW:HIGH, LOW:HIGH:log or A,B,C")  # fmt: skip
    parser.add_argument("--pruner", default="median", choices=PRUNERS)
    parser.add_argument("--prune-after", type=int, default=0,
                        help="epochs a trial trains before it can be pruned "
                        "(default: --epochs // 3, at least 1)")  # fmt: skip
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
    metric = args.metric or base.monitor
    if metric not in MONITORS:
        raise UserError(
            f"--metric '{metric}' is unknown; tune can optimise one of {', '.join(MONITORS)} "
            "(the metrics every epoch reports). Nothing was trained."
        )
    direction = args.direction or DIRECTIONS[MONITORS[metric]]
    # The trials' best epoch is picked by the tuned metric, so a trial's value is its best.
    base = dataclasses.replace(base, monitor=metric, resume_run_id="")
    base.validate()
    space_file = Path(args.space) if args.space else None  # --space '': only --param
    if args.space not in ("", "tune.yaml") and not space_file.exists():
        raise UserError(f"--space {space_file} does not exist")
    space = search_space.load_space(space_file, args.param, config_cls, given - {"monitor"})
    search_space.check_space(space, base)
    storage = args.storage or default_storage()
    open_storage(storage)  # reachable, before any run exists
    study_name = args.study_name or (
        f"{base.experiment_name}-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    settings = TuneSettings(
        hooks=args.hooks, study_name=study_name, storage=storage, metric=metric,
        direction=direction, pruner=args.pruner, base=dataclasses.asdict(base),
        space=[dataclasses.asdict(p) for p in space], parent_run_id="", stop_at=0,
        deadline=time.time() + args.timeout if args.timeout > 0 else 0.0, seed=base.seed,
        # early epochs are noisy (a high learning rate starts badly): wait a third of them
        prune_after=args.prune_after or max(1, base.epochs // 3),
    )  # fmt: skip
    return settings, args.workers, args.trials


# ----------------------------------------------------------------------------
# The study and its parent run
# ----------------------------------------------------------------------------


def make_study(settings: TuneSettings, worker: int = 0):
    """Create or load the study; each worker's sampler gets its own seed."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = {
        # a trial is compared with the median of the finished ones at the same epoch,
        # once 2 have finished and it has trained prune_after epochs
        "median": lambda: optuna.pruners.MedianPruner(
            n_startup_trials=2, n_warmup_steps=settings.prune_after
        ),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(
            min_resource=settings.prune_after, max_resource=settings.base["epochs"]
        ),
        "none": optuna.pruners.NopPruner,
    }[settings.pruner]()
    sampler = optuna.samplers.TPESampler(seed=settings.seed + worker, n_startup_trials=4)
    return optuna.create_study(
        study_name=settings.study_name, storage=open_storage(settings.storage),
        direction=settings.direction, sampler=sampler, pruner=pruner, load_if_exists=True,
    )  # fmt: skip


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(study, requeue: bool = True) -> int:
    """Mark trials left RUNNING by a dead worker FAILED (their MLflow runs too) and, with
    requeue, queue each again with its parameters; returns how many."""
    import mlflow
    from optuna.trial import TrialState

    storage = study._storage
    study_id = storage.get_study_id_from_name(study.study_name)
    client = mlflow.MlflowClient()
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get("worker", "")).partition(":")
        if host == socket.gethostname() and pid.isdigit() and pid_alive(int(pid)):
            continue  # another `make tune` on this machine is running it
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "tune.failed", "worker died; trial queued again")
            client.set_terminated(run_id, "FAILED")
        if requeue and trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        print(f"trial {trial.number} was left running by a stopped worker: marked FAILED"
              + (f" (run {run_id})" if run_id else "")
              + (", queued again" if requeue else ""))  # fmt: skip
        count += 1
    return count


def open_parent_run(study, settings: TuneSettings, tracking_uri: str) -> str:
    """The study's parent run: the one it had (reopened), or a new one."""
    import mlflow
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    from engine import tracking

    client = mlflow.MlflowClient()
    run_id = study.user_attrs.get("mlflow_parent_run_id", "")
    if run_id:
        try:
            client.update_run(run_id, status="RUNNING")
            print(f"continuing study {settings.study_name}: parent run {run_id}")
            return run_id
        except MlflowException:
            print(f"parent run {run_id} is not in {tracking_uri}; starting a new one")
    experiment_name = settings.base["experiment_name"]
    tracking.set_experiment(experiment_name, tracking_uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    run = client.create_run(
        experiment.experiment_id,
        run_name=settings.study_name,
        tags={"tune.study": settings.study_name, "tune.role": "parent"},
    )
    run_id = run.info.run_id
    study.set_user_attr("mlflow_parent_run_id", run_id)
    searched = {p["name"] for p in settings.space}
    params = {k: v for k, v in settings.base.items() if k not in searched}
    params.update({
        "tune.study_name": settings.study_name, "tune.storage": safe_url(settings.storage),
        "tune.metric": settings.metric, "tune.direction": settings.direction,
        "tune.pruner": settings.pruner, "tune.prune_after": settings.prune_after,
        "tune.space": json.dumps(settings.space),
    })  # fmt: skip
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run_id


# ----------------------------------------------------------------------------
# The end: summary, best trial, registration, plots
# ----------------------------------------------------------------------------


def save_plots(study, folder: Path) -> list[str]:
    """Optuna's matplotlib plots of the study as PNGs in folder; returns the names written."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as plots

    written = []
    for name, plot in (("optimization_history", plots.plot_optimization_history),
                       ("param_importances", plots.plot_param_importances),
                       ("intermediate_values", plots.plot_intermediate_values),
                       ("slice", plots.plot_slice)):  # fmt: skip
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks these plots experimental
                axes = plot(study)
        except Exception as err:  # e.g. importances need two finished trials
            print(f"  no {name} plot: {err}")
            continue
        figure = np.ravel(axes)[0].figure
        figure.savefig(folder / f"{name}.png", bbox_inches="tight")
        plt.close(figure)
        written.append(name)
    return written


def finish(study, settings: TuneSettings) -> dict[str, Any]:
    """Log the study's outcome on the parent run, register the best trial's model."""
    import mlflow
    from mlflow.entities import Param, RunTag
    from optuna.trial import TrialState

    client = mlflow.MlflowClient()
    parent = settings.parent_run_id
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    step = len(trials)
    for name, state in (
        ("trials_finished", TrialState.COMPLETE),
        ("trials_pruned", TrialState.PRUNED),
        ("trials_failed", TrialState.FAIL),
    ):
        client.log_metric(parent, name, counts[state], step=step)  # fmt: skip
    summary: dict[str, Any] = {"parent_run_id": parent, "trials": len(trials),
                               "finished": counts[TrialState.COMPLETE],
                               "pruned": counts[TrialState.PRUNED],
                               "failed": counts[TrialState.FAIL]}  # fmt: skip
    if counts[TrialState.COMPLETE]:
        best = study.best_trial
        client.log_metric(parent, "best_value", best.value, step=step)
        best_tags = {f"best.{k}": str(v) for k, v in best.params.items()}
        best_tags.update(
            best_trial=str(best.number), best_run_id=best.user_attrs.get("mlflow_run_id", "")
        )
        client.log_batch(parent, tags=[RunTag(k, v) for k, v in best_tags.items()])
        logged = client.get_run(parent).data.params
        # a parameter cannot change: after a resume that found a better trial, the
        # best.* tags hold the current best
        client.log_batch(parent, params=[
            Param(f"best.{k}", str(v))
            for k, v in best.params.items() if f"best.{k}" not in logged
        ])  # fmt: skip
        summary.update(best_trial=best.number, best_value=best.value, best_params=best.params,
                       best_run_id=best.user_attrs.get("mlflow_run_id"))  # fmt: skip
        summary["model_version"] = register_best(study, best, settings)
    with tempfile.TemporaryDirectory() as tmp:
        if save_plots(study, Path(tmp)):
            client.log_artifacts(parent, tmp, "plots")
    client.set_terminated(parent, "FINISHED")
    return summary


def register_best(study, best, settings: TuneSettings) -> str | None:
    """Register the best trial's logged model and give it the alias (once per best trial)."""
    import mlflow

    name, alias = settings.base["registered_model_name"], settings.base["model_alias"]
    model_uri = best.user_attrs.get("model_uri")
    if not name or not model_uri:
        return None
    registered = study.user_attrs.get("registered", {})
    if str(best.number) in registered:
        return registered[str(best.number)]
    print(f"registering trial {best.number}'s model as {name} ...")
    version = mlflow.register_model(model_uri, name).version
    client = mlflow.MlflowClient()
    if alias:
        client.set_registered_model_alias(name, alias, str(version))
    run_id = best.user_attrs.get("mlflow_run_id")
    if run_id:
        client.set_tag(run_id, "tune.registered_version", str(version))
    study.set_user_attr("registered", {**registered, str(best.number): str(version)})
    return str(version)


# ----------------------------------------------------------------------------


def check_data_once(settings: TuneSettings) -> None:
    """Load the data once before the workers start: bad data stops the study before any
    trial, and data made on first use (the demo images) is not made by two workers at once.
    """
    from engine.training import check_data

    config_cls, load_data, _ = load_hooks(settings.hooks)
    print("checking the data ...")
    _, _, info = check_data(load_data(config_cls(**settings.base)))
    print(f"  {info.train_count} training / {info.val_count} validation images, "
          f"classes {info.class_names}")  # fmt: skip


def main(argv: list[str] | None = None, launcher=None) -> int:
    """Run a study (or, as `worker FILE N`, one worker of it).

    Args:
        launcher: how workers start (LocalWorkers by default; project_driver.py passes
            DockerWorkers): check(settings) raises UserError, command(worker, json)
            gives a worker's command line and environment.

    Returns:
        0 when the study ran, 2 for a problem the user can fix (message, no traceback).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if argv[:1] == ["worker"]:
        from engine.tune_workers import worker_main

        return worker_main(argv[1], int(argv[2]))
    from engine import tracking, tune_workers

    try:
        settings, workers, trials = prepare(argv)
        tracking_uri = tracking.configure_tracking()
        hooks_dir = Path(importlib.import_module(settings.hooks).__file__).resolve().parent
        launcher = launcher or tune_workers.LocalWorkers(hooks_dir)
        launcher.check(settings)
        check_data_once(settings)
        study = make_study(settings)
        if study.direction.name.lower() != settings.direction:
            raise UserError(
                f"study {settings.study_name} {study.direction.name.lower()}s; it cannot "
                f"{settings.direction} now. Pick another --study-name or --direction."
            )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    recover_dead_trials(study)
    settings.parent_run_id = open_parent_run(study, settings, tracking_uri)
    from optuna.trial import TrialState

    waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    settings.stop_at = len(study.get_trials(deepcopy=False)) - waiting + trials
    print(f"study {settings.study_name} ({safe_url(settings.storage)}): {trials} trial(s), "
          f"{workers} worker(s), {settings.direction} {settings.metric}; parent run "
          f"{settings.parent_run_id}")  # fmt: skip
    for param in settings.space:
        print(f"  {search_space.Param(**param).describe()}")
    started = time.time()
    # SIGTERM (kill, a scheduler) stops the workers as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        status = tune_workers.wait_for(tune_workers.start_workers(launcher, settings, workers))
    except (KeyboardInterrupt, SystemExit) as stop:
        import mlflow

        # the workers are gone now: a trial one could not close (stopped mid-call, or
        # killed after a minute) is failed here, as its worker would have, not left RUNNING
        recover_dead_trials(study, requeue=False)
        mlflow.MlflowClient().set_terminated(settings.parent_run_id, "KILLED")
        print(f"\nstopped; the running trials are marked FAILED. Continue the study with "
              f"--study-name {settings.study_name}"
              + (f" --storage {safe_url(settings.storage)}" if "://" in settings.storage
                 else ""), file=sys.stderr)  # fmt: skip
        return stop.code if isinstance(stop, SystemExit) and stop.code else 130
    summary = finish(study, settings)
    print(f"\ndone in {time.time() - started:.0f} s: {summary['trials']} trial(s) in the "
          f"study, {summary['finished']} finished, {summary['pruned']} pruned, "
          f"{summary['failed']} failed")  # fmt: skip
    if "best_value" in summary:
        print(f"best trial {summary['best_trial']}: {settings.metric} "
              f"{summary['best_value']:.4f} {summary['best_params']} "
              f"(run {summary['best_run_id']})")  # fmt: skip
    if summary.get("model_version"):
        print(
            f"registered model: {settings.base['registered_model_name']} version "
            f"{summary['model_version']} (alias {settings.base['model_alias']})"
        )
    print(
        f"parent run: {settings.parent_run_id}; continue this study with "
        f"--study-name {settings.study_name}"
    )
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
