"""Likely label errors: confident learning on a run's out-of-sample predictions, the
K-fold label audit of the training split, and validate's warning about data the model
trained on. The images are made here: dark and bright squares, so a tiny network learns
them in a few epochs, and a black square filed as bright is surely the odd one."""

from __future__ import annotations

import csv
import dataclasses
import json
import os

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

import lifecycle
import train
from engine import data_overlap, label_errors, scoring, validation
from engine.file_sources import load_dataframe
from engine.images import DataInfo
from tests.conftest import engine_config, tiny_config, train_and_log

CLASSES = ("bright", "dark")


def write_squares(folder, plan: list[tuple[str, str, str]], seed: int = 0) -> str:
    """PNGs of 32x32 squares and a table.csv of path,label,split; returns the table's path.

    plan: (what the image shows: bright, dark or black, its label, its split) per image.
    A black square is darker than any dark one: the model is surer of it than of any dark
    square, so confident learning's per-class threshold cannot hide it.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,split"]
    for i, (shows, label, split) in enumerate(plan):
        level = {"bright": 225, "dark": 40, "black": 0}[shows]
        pixels = np.clip(level + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:03d}-{shows}.png"
        Image.fromarray(pixels).save(path)
        rows.append(f"{path},{label},{split}")
    table = folder / "table.csv"
    table.write_text("\n".join(rows) + "\n")
    return str(table)


def balanced_plan(counts: dict[str, int]) -> list[tuple[str, str, str]]:
    """counts images of each class in each split, each labelled as it shows."""
    return [(c, c, split) for split, n in counts.items() for c in CLASSES for _ in range(n)]


def test_ranks_a_confidently_other_class_first():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    probs = np.array([[0.9, 0.1]] * 4 + [[0.1, 0.9]] * 4 + [[0.97, 0.03]])
    found = label_errors.Predictions(labels, probs, ["test"] * 9, [f"f{i}" for i in range(9)])
    entries, note = label_errors.rank_label_errors(found, list(CLASSES))
    assert note == "" and [e["path"] for e in entries] == ["f8"]
    assert entries[0]["given_class"] == "dark" and entries[0]["suggested_class"] == "bright"
    assert entries[0]["self_confidence"] == pytest.approx(0.03)
    assert entries[0]["rank"] == 1 and entries[0]["split"] == "test"


def test_too_few_images_give_none_and_a_note():
    found = label_errors.Predictions(np.array([1]), np.array([[0.9, 0.1]]), ["val"], [None])
    entries, note = label_errors.rank_label_errors(found, list(CLASSES))
    assert entries == [] and "too few images" in note


def test_a_model_at_chance_lists_nothing_and_says_why():
    """Under-trained, a model disagrees with many labels by its own fault: 37 'errors' of
    150 images from a model at 0.5 accuracy were noise in a fork's 3-epoch run."""
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 50)
    probs = rng.dirichlet([1, 1], size=100)  # guesses: about half right
    found = label_errors.Predictions(labels, probs, ["val"] * 100, [None] * 100)
    entries, note = label_errors.rank_label_errors(found, list(CLASSES))
    assert entries == [] and "barely better than always answering the largest class" in note
    # the same labels, predicted well, but for two flipped ones: those are listed
    good = np.eye(2)[labels] * 0.9 + 0.05
    good[[3, 10]] = good[[3, 10]][:, ::-1]
    found = label_errors.Predictions(labels, good, ["val"] * 100, [f"f{i}" for i in range(100)])
    entries, note = label_errors.rank_label_errors(found, list(CLASSES))
    assert note == "" and sorted(e["path"] for e in entries) == ["f10", "f3"]


def test_split_rows_name_each_prediction_by_its_file(tmp_path):
    """The val and test pipelines keep their split's order, and lineage's split_rows
    names the file of each image in it: the brightness of each image is its number."""
    folder = tmp_path / "numbered"
    folder.mkdir()
    rows = ["path,label"]
    for i in range(40):
        path = folder / f"{i:02d}.png"
        Image.fromarray(np.full((8, 8, 3), 5 * i + 10, np.uint8)).save(path)
        rows.append(f"{path},{CLASSES[i % 2]}")
    (folder / "table.csv").write_text("\n".join(rows) + "\n")
    cfg = engine_config(image_size=8, val_split=0.25, test_split=0.25)
    _, val_ds, info = load_dataframe(str(folder / "table.csv"), cfg, "path", "label")
    for split, ds in (("val", val_ds), ("test", info.test_ds)):
        pixels = np.concatenate([images.numpy()[:, 0, 0, 0] for images, _ in ds])
        found = label_errors.split_predictions(
            np.zeros(len(pixels)), np.zeros((len(pixels), 2)), split, info.lineage
        )
        numbers = [int(path.rsplit("/", 1)[1][:2]) for path in found.paths]
        assert len(numbers) == 10 and (pixels == [5 * n + 10 for n in numbers]).all(), split


def test_existing_data_check_keeps_its_keys(tracking_store):
    """A data_check.json logged before (the data check's) keeps its findings."""
    found = label_errors.Predictions(
        np.array([0, 0, 1, 1, 1]),
        np.array([[0.9, 0.1]] * 2 + [[0.1, 0.9]] * 2 + [[0.99, 0.01]]),
        ["val"] * 5,
        [f"f{i}" for i in range(5)],
    )
    with mlflow.start_run() as run:
        mlflow.log_dict({"label_conflicts": [{"paths": ["a", "b"]}]}, label_errors.ARTIFACT)
        label_errors.log_label_errors(found, list(CLASSES))
    report = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{label_errors.ARTIFACT}")
    assert report["label_conflicts"] == [{"paths": ["a", "b"]}]
    assert [e["path"] for e in report["likely_label_errors"]] == ["f4"]
    assert MlflowClient().get_run(run.info.run_id).data.metrics["data_likely_label_errors"] == 1


@pytest.mark.slow
def test_a_run_ranks_a_planted_mislabel_among_its_likely_label_errors(
    tracking_store, tmp_path, capsys
):
    plan = balanced_plan({"train": 32, "val": 6, "test": 6})
    plan.append(("black", "bright", "test"))  # a black square filed as bright
    table = write_squares(tmp_path / "squares", plan)
    cfg = tiny_config(data_source="dataframe", data_dir=table, epochs=8, learning_rate=0.01)
    result = train_and_log(cfg)
    assert "likely label errors: " in capsys.readouterr().out

    report = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/{label_errors.ARTIFACT}")
    assert set(label_errors.KEYS) <= set(report)
    ranked = report["likely_label_errors"]
    top = [e["path"] for e in ranked[:3]]
    planted = str(tmp_path / "squares" / f"{len(plan) - 1:03d}-black.png")
    assert planted in top, json.dumps(ranked, indent=1)
    entry = ranked[top.index(planted)]
    assert (entry["given_class"], entry["suggested_class"], entry["split"]) == (
        "bright",
        "dark",
        "test",
    )
    metrics = MlflowClient().get_run(result.run_id).data.metrics
    assert metrics["data_likely_label_errors"] == len(ranked) >= 1


def test_evaluated_files_follow_the_split_rows():
    lineage = {"table": {"path": ["a", "b", "c"]}, "split_rows": {"val": [2], "test": [1, 0]}}
    assert data_overlap.evaluated_files(lineage, "test") == ["b", "a"]
    assert data_overlap.evaluated_files(lineage, "validation") == ["c"]
    assert data_overlap.evaluated_files(lineage, "all") == ["a", "b", "c"]
    assert data_overlap.evaluated_files({"digest": "x"}, "test") is None


@pytest.mark.slow
def test_validate_warns_when_it_scores_the_models_training_images(tracking_store, tmp_path, capsys):
    plan = [(c, c, "") for _ in range(12) for c in CLASSES]
    table = write_squares(tmp_path / "squares", plan)
    rows = (tmp_path / "squares" / "table.csv").read_text().replace(",\n", "\n")
    (tmp_path / "squares" / "table.csv").write_text(rows.replace("path,label,split", "path,label"))
    cfg = tiny_config(data_source="dataframe", data_dir=table, epochs=1, seed=0)
    result = train_and_log(cfg)
    model = f"models:/tiny-classifier/{result.model_version}"

    same = validation.validate(model, cfg, train.load_data, promote=False)
    assert same.overlap is not None and same.overlap.in_training == []
    assert "training split" not in capsys.readouterr().out

    redrawn = dataclasses.replace(cfg, seed=7)  # another split: its test images were trained on
    other = validation.validate(model, redrawn, train.load_data, promote=False)
    assert other.overlap is not None and len(other.overlap.in_training) >= 1
    out = capsys.readouterr().out
    assert f"{len(other.overlap.in_training)} of the {other.overlap.evaluated} evaluated" in out
    assert "were in the model's training split" in out
    assert os.path.basename(other.overlap.in_training[0]) in out
    run = MlflowClient().get_run(other.run_id)
    assert run.data.metrics["images_in_training_split"] == len(other.overlap.in_training)
    logged = mlflow.artifacts.load_dict(f"runs:/{other.run_id}/training_overlap.json")
    assert logged["in_training"] == other.overlap.in_training


@pytest.mark.slow
def test_label_audit_finds_a_planted_training_mislabel(tracking_store, tmp_path, capsys):
    plan = balanced_plan({"train": 24, "val": 4})
    plan.append(("black", "bright", "train"))  # a black square filed as bright, in training
    table = write_squares(tmp_path / "squares", plan)
    planted = str(tmp_path / "squares" / f"{len(plan) - 1:03d}-black.png")
    output = tmp_path / "audit"
    flags = ["--data-source", "dataframe", "--data-dir", table, "--image-size", "32"]
    flags += ["--convolutions", "1", "--dense-units", "8", "--batch-size", "8"]
    flags += ["--learning-rate", "0.01", "--randomize-images", "false", "--seed", "0"]
    flags += ["--experiment-name", "audit", "--folds", "3", "--epochs", "10"]
    assert lifecycle.main(["label-audit", *flags, "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "likely label errors among 49 training images" in out and planted in out

    with (output / "label_audit.csv").open() as report:
        rows = list(csv.DictReader(report))
    top = [row["path"] for row in rows[:3]]
    assert planted in top, rows
    row = rows[top.index(planted)]
    assert (row["given_class"], row["suggested_class"]) == ("bright", "dark")
    (run,) = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("audit").experiment_id]
    )
    assert run.data.tags["label_audit"] == "true"
    assert run.data.metrics["data_likely_label_errors"] == len(rows)
    assert MlflowClient().search_registered_models() == []
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"label_audit.csv", "label_audit.json"} <= logged


def test_a_split_too_small_logs_none_with_a_note_and_the_run_goes_on(tracking_store, capsys):
    info = DataInfo(image_shape=(8, 8, 3), class_names=list(CLASSES), train_count=4, val_count=1)
    val = label_errors.split_predictions(np.array([1]), np.array([[0.8, 0.2]]), "val", {})
    with mlflow.start_run() as run:
        assert scoring.log_test(None, info, val) == {}  # no test split: nothing to predict
    out = capsys.readouterr().out
    assert "likely label errors: 0 (see data_check.json); too few images" in out
    report = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/{label_errors.ARTIFACT}")
    assert {key: report[key] for key in label_errors.KEYS} == {key: [] for key in label_errors.KEYS}
    assert "too few images" in report["likely_label_errors_note"]
    assert MlflowClient().get_run(run.info.run_id).data.metrics["data_likely_label_errors"] == 0
