"""What a study's coordinator and its workers share: the settings, and how workers start.

Light on purpose (the standard library and engine.common): the host imports it through
`from engine import tune` to plan Docker workers, and must not pay for Optuna, MLflow
or TensorFlow there.
"""

from __future__ import annotations

import dataclasses
import importlib
import urllib.parse
from typing import Any, Protocol

from engine.common import storage_folder

DIRECTIONS = {"min": "minimize", "max": "maximize"}
PRUNERS = ("median", "hyperband", "none")
# A worker started as `python -m engine.tune worker - N` reads its settings from here.
SETTINGS_ENV = "TUNE_SETTINGS"


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


class Launcher(Protocol):
    """How a study's workers start: what `engine.tune.main(argv, launcher=...)` is given.

    engine.tune.launch.LocalWorkers (the default) starts each worker as a process on
    this machine; the host's DockerWorkers (`make tune-docker`) as a container. The
    engine only calls these two methods, and never imports the host. Two optional
    attributes: `processes` (1: one command starts every worker, as the host's
    KubeWorkers' Indexed Job does) and `data_here` (False: the data is not on this
    machine, so the study does not load it once before the workers start).
    """

    def check(self, settings: TuneSettings) -> None:
        """Raise engine.config.UserError when these workers could not run the study
        (e.g. a storage the containers cannot share); called before any run exists."""

    def command(self, worker: int, settings_json: str) -> tuple[list[str], dict[str, str]]:
        """Worker N's command line and its whole environment.

        The command must run `python -m engine.tune worker - N` with settings_json (a
        TuneSettings as JSON) in the SETTINGS_ENV variable, where it can reach the
        study's storage and tracking server.
        """


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


def load_hooks(module_name: str) -> tuple[type, Any, Any]:
    """(Config, load_data, define_network) from the module the fork keeps them in."""
    module = importlib.import_module(module_name)
    return module.Config, module.load_data, module.define_network
