"""`make tune`: an Optuna search whose workers pull trials, recorded as one MLflow parent run.

    python -m engine.tune train --trials 20 --workers 2 --epochs 8 --data-source demo

The first argument names the module holding Config, load_data and define_network
(the engine never imports train.py by itself). Tune's own flags come next; every
other flag is a train flag passed to each trial, and a train flag also pins that
parameter (it is then not searched). The search space is tune.yaml (see
engine/tune/space.py), overridden by --param.

K worker processes each loop ask -> train -> tell until the study holds enough trials
or the time is up: a free worker takes the next trial at once (no batch barrier). Each
trial is one run_training run, an MLflow child run of the study's parent run; a pruning
callback reports the monitored metric every epoch and stops a bad trial, whose run ends
FINISHED with the tags tune.pruned=true and tune.pruned_epoch=N. Trials log their model
but do not register it; at the end the best trial's model is registered with the alias.
The study lives in a journal file (one machine) or a database URL (postgresql://...):
starting again with the same --study-name continues it.

Modules, each importing only those listed after it:

    cli          flags, the checks before anything runs, main() (light at import)
    coordinator  the data check, the parent run, the workers, the outcome (MLflow, TF)
    worker       one worker: ask, train, tell; the pruning callback (Keras)
    records      the parent run's records, dead workers' trials, the best model
    launch       LocalWorkers (processes on this machine), relaying their output
    study        the Optuna storage and study
    space        tune.yaml and --param: the parameters a study searches, checked
    settings     TuneSettings, SETTINGS_ENV and the Launcher protocol

The host (`make tune-docker`) uses only what this file exports: main(argv,
launcher=...), SETTINGS_ENV, TuneSettings and Launcher. Importing it loads Optuna,
not MLflow, TensorFlow or Keras.
"""

from engine.tune.cli import main, prepare
from engine.tune.settings import SETTINGS_ENV, Launcher, TuneSettings
from engine.tune.study import open_storage

__all__ = ["SETTINGS_ENV", "Launcher", "TuneSettings", "main", "open_storage", "prepare"]
