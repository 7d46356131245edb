"""The template's engine: everything a run needs besides the forker's train.py.

train.py hands its Config class and its two functions to the engine, e.g.
`engine.cli.main(Config, load_data, define_network)`; nothing in this package
imports train.py or lifecycle.py. One module per concern:

    config      RunConfig (the engine's own knobs), UserError, flags made from a Config
    images      splitting, skipped-file reports; the tf.data pipelines every source ends in
    decoding    decode and resize: the one definition training, the cache and predict share
    cache       the decoded-image cache every run shares (--cache-dir)
    sources     the built-in data sources: imagedir, dataframe, arrays, tfds, demo
    network     the network contract: checked before a run, compiled when uncompiled
    evaluation  metrics (scikit-learn) and plots
    tracking    where runs go, per-epoch metrics, logging and registering the model
    serving     the registered model: base64 image files in, class names out
    training    run_training(cfg, load_data, define_network)
    checkpoints the best epoch, per-epoch checkpoints and resuming a run
    provenance  which code a folder or image holds; stops a run on the wrong code
    cli         main(): flags, errors without tracebacks, signals
    mlproject   the MLproject `main` entry point, written from a Config
    search_space  tune.yaml and --param: the parameters a study searches, checked
    tune        `make tune`: an Optuna study, its MLflow parent run, the best model
    tune_workers  the worker loop (ask, train, tell) and the pruning callback

Importing `engine` (or any module of it) sets nothing: no environment variable,
no log level, no signal handler. Those happen in cli.main() and tune.main().
"""

from engine.config import RunConfig, UserError, knob

__all__ = ["RunConfig", "UserError", "knob"]
