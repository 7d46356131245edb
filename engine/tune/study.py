"""The Optuna side of a study: its storage (a journal file or a database) and the study.

Imports Optuna, not MLflow or TensorFlow: `from engine import tune` stays cheap.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from engine.config import UserError
from engine.tune.settings import TuneSettings, safe_url


def open_storage(url: str, timeout: float = 5.0) -> optuna.storages.BaseStorage:
    """An Optuna storage for a database URL or a journal file path; checked to work.

    Raises:
        UserError: the database does not answer or refuses the login, or the file's
            folder cannot be written.
    """
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


def make_pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    """The pruner --pruner names, waiting --prune-after epochs."""
    if settings.pruner == "median":
        # a trial is compared with the median of the finished ones at the same epoch,
        # once 2 have finished and it has trained prune_after epochs
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=settings.prune_after)
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=settings.prune_after, max_resource=settings.base["epochs"]
        )
    return optuna.pruners.NopPruner()


def make_study(settings: TuneSettings, worker: int = 0) -> optuna.Study:
    """Create or load the study; each worker's sampler gets its own seed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=settings.seed + worker, n_startup_trials=4)
    return optuna.create_study(
        study_name=settings.study_name,
        storage=open_storage(settings.storage),
        direction=settings.direction,
        sampler=sampler,
        pruner=make_pruner(settings),
        load_if_exists=True,
    )
