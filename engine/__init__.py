"""The template's engine: everything a run needs besides the forker's train.py.

train.py hands its Config class and its two functions to the engine, e.g.
`engine.cli.main(Config, load_data, define_network)`; nothing in this package
imports train.py, lifecycle.py, project_driver.py or host/. One module per concern:

    config        RunConfig (the engine's own knobs), UserError, flags made from a Config
    common        light helpers host and container share (project folder, storage, URIs)
    images        skipped-file reports; the tf.data pipelines every source ends in
    splits        train/val/test: seeded, stratified, groups (a patient, near duplicates) whole
    datacheck     --data-check: duplicates, label conflicts, balance, blank images; the groups
    datacheck_log the check's line or strict's refusal before a run; its artifacts in the run
    perceptual    image fingerprints in NumPy and near-duplicate search (multi-index hashing)
    decoding      decode and resize: the one definition training, the cache and predict share
    headers       an image file's size and EXIF orientation, read before decoding
    cache         the decoded-image cache every run shares (--cache-dir)
    cache_folder  how runs share a cache folder: its lock and its modes
    cache_store   writing to the cache: one decoding pass, shards, compaction, leftovers
    cache_hashes  the data check's fingerprints, kept in the cache beside the images
    shards        the cache's shard files: written a piece at a time, checked, read by row
    memory        --memory-budget: what the decoded images may take; memory or stream
    pipelines     decoded images into tf.data: held in memory or streamed
    stream        batches read by row from the cache's shards (data larger than memory)
    sources       the built-in data sources, one import path for the two modules below
    file_sources  image files: imagedir, dataframe (a table of paths), demo
    array_sources images as arrays: arrays (.npz/HDF5), tfds
    data_contract load_data's contract, checked before a run
    network       the network contract: checked before a run, compiled when uncompiled
    balance       imbalanced classes: a warning, class weights, a sigmoid's prior bias
    devices       the distribution strategy and the compute dtype
    multiworker   training over several machines: TF_CONFIG, the chief, the workers' run
    keras_patches Keras fit under MultiWorkerMirroredStrategy (engine.multiworker)
    evaluation    metrics (scikit-learn) and plots
    scoring       the chosen model scored once on validation and test, logged
    label_errors  likely label errors: confident learning (cleanlab) on out-of-sample predictions
    label_audit   lifecycle.py label-audit: its flags (light); label_audit_run: the K-fold audit
    tracking      where runs go, per-epoch metrics, logging and registering the model
    serving       the registered model: base64 image files in, class names out
    training      run_training(cfg, load_data, define_network), phase by phase
    checkpoints   the best epoch, per-epoch checkpoints and restoring them
    resuming      a crashed run reopened: its config, its missing epochs, how to resume
    provenance    which code a folder or image holds; stops a run on the wrong code
    environment   the lock a run's packages came from (lock/): its digest and drift, as run tags
    dockerignore  which files `docker build` sends, read the way Docker reads them
    cli           main(): flags, errors without tracebacks, signals
    mlproject     the MLproject `main` entry point, written from a Config
    tune/         `make tune`: an Optuna study, its workers, its MLflow parent run
    registry      registered model references and aliases (lifecycle.py)
    validation    validate: evaluate, compare, promote (lifecycle.py validate)
    data_overlap  validate's check that the evaluated images were not the model's training images
    prediction    predict to CSV, serve over REST, export for TF Serving
    client        ask a served model (standard library only)
    reaping       reap-runs: runs whose process died marked FAILED
    run_record    what a run records for `make reproduce`: its files and its determinism
    reproduction  make reproduce: a run trained again from its record (commit, params, data)
    reproduction_verdict  the two runs compared figure by figure; require-reproduced
    reproduction_flags    reproduce's flags, light for --help

Importing `engine` (or any module of it) sets nothing: no environment variable,
no log level, no signal handler. Those happen in cli.main() and tune's main().
"""

from engine.config import RunConfig, UserError, knob

__all__ = ["RunConfig", "UserError", "knob"]
