"""The label audit itself: K-fold out-of-sample probabilities of the training images,
ranked by confident learning (engine.label_errors), reported and logged.

A run's own likely label errors come from its validation and test images, the only ones
its model never trained on. The training split, usually most of the images, needs models
that did not see them: its images are cut into K stratified, seeded folds; the fork's
define_network trains for a few epochs on K-1 of them and predicts the one left out, so
every training image gets a probability from a model that never saw it. The images come
from the decoded-image cache the run filled, through the same pipelines as training.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
from sklearn.model_selection import StratifiedKFold

from engine import cache as image_cache
from engine import label_errors, network, tracking
from engine.config import RunConfig, UserError
from engine.data_contract import LoadData, check_data
from engine.images import DataInfo
from engine.pipelines import FileDecoder, Source, load_source
from engine.scoring import predict_probabilities

COLUMNS = ("rank", "path", "given_class", "suggested_class", "self_confidence")


def training_files(info: DataInfo) -> tuple[list[str], np.ndarray]:
    """The training split's files and class indices, from the data's lineage table."""
    table, rows = info.lineage.get("table"), (info.lineage.get("split_rows") or {}).get("train")
    if table is None or rows is None:
        raise UserError(
            f"label-audit needs image files (data sources imagedir, dataframe or demo); "
            f"'{info.source or 'this source'}' gives no table of files to name"
        )
    index = {name: k for k, name in enumerate(info.class_names)}
    return [table["path"][r] for r in rows], np.array([index[table["label"][r]] for r in rows])


def fold_probabilities(
    cfg: RunConfig,
    define_network: network.DefineNetwork,
    info: DataInfo,
    held: Source,
    labels: np.ndarray,
    folds: int,
) -> tuple[np.ndarray, int]:
    """(N, K) probabilities of the training images, each from the fold that left it out,
    and the number of folds (at most the smallest class's images)."""
    smallest = int(np.bincount(labels, minlength=info.num_classes).min())
    if smallest < 2:
        raise UserError(
            "label-audit needs at least 2 training images of every class; the smallest "
            f"class has {smallest}"
        )
    folds = min(folds, smallest)
    probs = np.zeros((len(labels), info.num_classes), np.float32)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=cfg.seed)
    for fold, (fit_at, held_out) in enumerate(splitter.split(labels, labels), start=1):
        print(f"fold {fold} of {folds}: training on {len(fit_at)} images for {cfg.epochs} epochs")
        keras.utils.set_random_seed(cfg.seed + fold)
        steps = -(-len(fit_at) // cfg.batch_size)
        model, head = network.build_network(
            define_network, info.image_shape, info.num_classes, cfg, steps
        )
        train_ds = held.pipeline(fit_at, labels, cfg, training=True)
        model.fit(
            network.encode_labels(train_ds, head, info.num_classes),
            epochs=cfg.epochs,
            shuffle=False,  # the training pipeline reshuffles itself every epoch
            verbose="auto" if sys.stdout.isatty() else 0,
        )
        _, probs[held_out] = predict_probabilities(
            model, held.pipeline(held_out, labels, cfg, False)
        )
        keras.backend.clear_session()
    return probs, folds


def write_report(entries: list[dict], folder: Path, header: dict) -> list[Path]:
    """label_audit.json (the header and every entry) and label_audit.csv in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "label_audit.json", folder / "label_audit.csv"]
    written[0].write_text(json.dumps({**header, "likely_label_errors": entries}, indent=1) + "\n")
    with written[1].open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=[*COLUMNS, "suggested_probability"])
        writer.writeheader()
        writer.writerows({k: e[k] for k in writer.fieldnames} for e in entries)
    return written


def audit(
    cfg: RunConfig,
    load_data: LoadData,
    define_network: network.DefineNetwork,
    folds: int,
    output: Path,
    top: int = 10,
) -> list[dict]:
    """Rank the likely label errors among the training images; report and log them.

    Args:
        cfg: the fork's Config (data knobs, network knobs, epochs per fold, seed).
        load_data: the fork's load_data; its training split is audited.
        define_network: the fork's network, trained afresh on each fold.
        folds: K, the number of folds (fewer when a class has fewer training images).
        output: the folder for label_audit.json and label_audit.csv.
        top: how many entries to print.

    Returns:
        The ranked entries (as engine.label_errors.rank_label_errors).
    """
    cfg.validate()
    uri = tracking.configure_tracking()
    print("loading data ...")
    _, _, info = check_data(load_data(cfg))
    paths, labels = training_files(info)
    held = load_source([image_cache.file_key(p) for p in paths], FileDecoder(paths, cfg), cfg)
    probs, folds = fold_probabilities(cfg, define_network, info, held, labels, folds)
    found = label_errors.Predictions(labels, probs, ["train"] * len(paths), list(paths))
    entries, note = label_errors.rank_label_errors(found, info.class_names)
    # how well the fold networks learned: near chance, the ranking says little
    accuracy = round(float((probs.argmax(axis=1) == labels).mean()), 4)
    header = {"images": len(paths), "folds": folds, "epochs": cfg.epochs, "note": note}
    header["out_of_fold_accuracy"] = accuracy
    written = write_report(entries, output, header)
    tracking.set_experiment(cfg.experiment_name, uri)
    with mlflow.start_run(run_name=f"label-audit-{info.source or 'data'}") as run:
        mlflow.set_tags({"label_audit": "true", "data_source": info.source or "data"})
        mlflow.log_params({**header, "seed": cfg.seed, "data_dir": getattr(cfg, "data_dir", "")})
        mlflow.log_metric(label_errors.METRIC, len(entries))
        for path in written:
            mlflow.log_artifact(str(path))
        tracking.log_dataset(info.lineage)
    chance = np.bincount(labels).max() / len(labels)  # always guessing the largest class
    weak = (
        "; near chance, so the list says little: more --epochs" if accuracy < chance + 0.1 else ""
    )
    print(
        f"label audit: {len(entries)} likely label errors among {len(paths)} training images "
        f"(out-of-fold accuracy {accuracy:.3f}{weak})"
    )
    for entry in entries[:top]:
        print(
            f"  {entry['rank']}. {entry['path']}: filed as {entry['given_class']}, looks like "
            f"{entry['suggested_class']} ({entry['suggested_probability']:.2f})"
        )
    print(f"report: {written[1]} (run {run.info.run_id}){f'; {note}' if note else ''}")
    return entries
