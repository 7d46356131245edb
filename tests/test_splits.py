"""Three splits for every source (stratified, seeded, disjoint), a source's own split,
imbalanced classes, and the arrays and table inputs real users bring.

Engine code only: the built-in sources are called directly with the engine's own knobs
(tests/conftest.py:engine_config), so a fork that replaces train.py's sources and
network, and deselects the `example` tests, keeps these."""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from engine import sources as src
from engine.balance import class_weights, init_output_bias, warn_imbalance
from engine.config import UserError
from engine.images import DataInfo, split_indices
from engine.network import weigh_classes
from tests.conftest import engine_config


def split_files(info: DataInfo) -> dict[str, set[str]]:
    table = info.lineage["table"]
    return {
        name: {p for p, s in zip(table["path"], table["split"], strict=True) if s == name}
        for name in ("train", "val", "test")
    }


@pytest.fixture
def three_classes(tmp_path):
    """20, 30 and 50 tiny PNGs in three class folders."""
    root = tmp_path / "three"
    for name, count in (("a", 20), ("b", 30), ("c", 50)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (9, 9), (i, len(name) * 40, 0)).save(root / name / f"{i}.png")
    return root


def test_three_splits_are_disjoint_stratified_and_stable(three_classes):
    cfg = engine_config(val_split=0.2, test_split=0.1)
    _, _, first = src.load_imagedir(str(three_classes), cfg)
    _, _, again = src.load_imagedir(str(three_classes), cfg)
    files = split_files(first)
    assert split_files(again) == files  # same seed and data: the same files in each split
    assert not (
        files["train"] & files["val"]
        or files["train"] & files["test"]
        or files["val"] & files["test"]
    )
    assert sum(map(len, files.values())) == 100
    # each class in the same proportions: 10% test, 20% validation
    assert first.class_counts == {"train": [14, 21, 35], "val": [4, 6, 10], "test": [2, 3, 5]}
    _, _, other = src.load_imagedir(str(three_classes), engine_config(seed=7))
    assert split_files(other)["test"] != files["test"]


def test_the_test_pipeline_holds_exactly_the_test_files(three_classes):
    _, _, info = src.load_imagedir(str(three_classes), engine_config())
    labels = np.concatenate([y.numpy() for _, y in info.test_ds])
    assert np.bincount(labels, minlength=3).tolist() == info.class_counts["test"]


def test_split_indices_keep_a_training_example_per_class_and_one_for_validation():
    train_idx, val_idx, test_idx = split_indices([0, 0, 1, 1], engine_config(val_split=0.2))
    assert len(val_idx) == 1 and set(np.array([0, 0, 1, 1])[train_idx]) == {0, 1}
    assert len(test_idx) == 0
    assert sorted(np.concatenate([train_idx, val_idx, test_idx]).tolist()) == [0, 1, 2, 3]


def test_test_split_zero_turns_it_off(three_classes):
    _, _, info = src.load_imagedir(str(three_classes), engine_config(test_split=0.0))
    assert info.test_ds is None and info.test_count == 0
    assert info.train_count + info.val_count == 100


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.5), (0.2, -0.1), (0.2, 1.0)])
def test_split_fractions_must_leave_training_data(val, test):
    with pytest.raises(UserError, match="test_split must be in"):
        engine_config(val_split=val, test_split=test).validate()


def _write_table(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_tables_split_column_is_used(three_classes, tmp_path):
    rows = []
    for label in ("a", "b", "c"):
        for i, path in enumerate(sorted((three_classes / label).glob("*.png"))):
            split = "test" if i < 3 else ("Validation" if i < 7 else "train")
            rows.append({"path": str(path), "label": label, "split": split})
    _write_table(tmp_path / "t.csv", rows)

    def load_table():
        return src.load_dataframe(
            str(tmp_path / "t.csv"), engine_config(), "path", "label", "split"
        )

    _, _, info = load_table()
    files = split_files(info)
    assert files["test"] == {r["path"] for r in rows if r["split"] == "test"}
    assert files["val"] == {r["path"] for r in rows if r["split"] == "Validation"}
    assert info.class_counts["test"] == [3, 3, 3]

    # no val rows: validation is drawn from the train rows, test stays as given
    for row in rows:
        row["split"] = "test" if row["split"] == "test" else "train"
    _write_table(tmp_path / "t.csv", rows)
    _, _, info = load_table()
    assert split_files(info)["test"] == {r["path"] for r in rows if r["split"] == "test"}
    assert info.val_count > 0

    rows[5]["split"] = "holdout"
    _write_table(tmp_path / "t.csv", rows)
    with pytest.raises(UserError, match="'holdout'; each row's split must be one of"):
        load_table()


def test_a_table_row_without_a_label_is_refused(three_classes, tmp_path):
    paths = sorted(str(p) for p in three_classes.rglob("*.png"))[:6]
    rows = [{"path": p, "label": "x" if i % 2 else "y"} for i, p in enumerate(paths)]
    rows[4]["label"] = " "
    _write_table(tmp_path / "t.csv", rows)
    with pytest.raises(UserError, match="1 row.s. have no label in column 'label' .e.g. line 6"):
        src.load_dataframe(str(tmp_path / "t.csv"), engine_config(), "path", "label", "split")


# ---------------------------------------------------------------- arrays files


def _arrays(tmp_path, images, labels, **more) -> str:
    """An arrays file (.npz) of these images and labels; its path."""
    path = tmp_path / "d.npz"
    np.savez(path, images=images, labels=labels, **more)
    return str(path)


def test_arrays_with_text_labels_use_them_as_class_names(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (40, 12, 12, 3), dtype=np.uint8)
    labels = np.array(["healthy", "sick"] * 20)
    _, _, info = src.load_arrays(_arrays(tmp_path, images, labels), engine_config())
    assert info.class_names == ["healthy", "sick"]


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        (np.array(["a", "b", "", "a"] * 10), "label.s. are empty"),
        (np.array([0.0, 1.0, np.nan, 1.0] * 10), "some labels are NaN"),
        (np.array([0.0, 1.5, 1.0, 0.0] * 10), "whole class indices or names"),
    ],
)
def test_arrays_with_missing_or_odd_labels_say_what_to_fix(tmp_path, labels, says):
    images = np.zeros((40, 12, 12, 3), np.uint8)
    with pytest.raises(UserError, match=says):
        src.load_arrays(_arrays(tmp_path, images, labels), engine_config())


def test_arrays_stored_channels_first_are_read(tmp_path, capsys):
    rng = np.random.default_rng(0)
    last = rng.integers(0, 255, (40, 16, 16, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 20)
    path = _arrays(tmp_path, np.transpose(last, (0, 3, 1, 2)), labels)
    train_ds, val_ds, _ = src.load_arrays(path, engine_config(image_size=16, test_split=0.0))
    assert "channels-first" in capsys.readouterr().out
    seen = np.concatenate([x.numpy() for x, _ in val_ds])
    assert seen.shape[1:] == (16, 16, 3)
    # every validation image is one of the originals, pixel for pixel
    originals = {im.tobytes() for im in last}
    assert all(im.astype(np.uint8).tobytes() in originals for im in seen)


def test_sixteen_bit_arrays_are_scaled_to_0_255(tmp_path):
    images = np.full((40, 8, 8, 1), 65535, np.uint16)
    path = _arrays(tmp_path, images, np.array([0, 1] * 20))
    train_ds, _, _ = src.load_arrays(path, engine_config(image_size=8, channels=1))
    assert float(next(iter(train_ds))[0].numpy().max()) == 255.0


# ---------------------------------------------------------------- imbalance


def _info(counts):
    return DataInfo((8, 8, 3), ["common", "rare"], sum(counts), 1, class_counts={"train": counts})


def test_balanced_class_weights_undo_the_imbalance():
    weights = class_weights("balanced", _info([95, 5]))
    assert weights == pytest.approx({0: 100 / 190, 1: 100 / 10})
    assert 95 * weights[0] == pytest.approx(5 * weights[1])  # each class weighs the same
    assert class_weights("none", _info([95, 5])) is None


def test_a_warning_names_a_class_under_a_tenth_of_the_largest(capsys):
    warn_imbalance(_info([95, 5]))
    assert "imbalanced classes: rare has 5 training images" in capsys.readouterr().out
    warn_imbalance(_info([60, 40]))
    assert capsys.readouterr().out == ""


def _network(units: int, activation: str) -> keras.Model:
    """A small classifier whose last layer is Dense(units, activation)."""
    layers = [keras.layers.Flatten(), keras.layers.Dense(units, activation=activation)]
    return keras.Sequential([keras.Input((8, 8, 3)), *layers])


def test_a_sigmoid_head_starts_at_the_class_prior():
    model = _network(1, "sigmoid")
    init_output_bias(model, _info([90, 10]))  # class 1 ("rare") is 10% of the images
    bias = keras.ops.convert_to_numpy(model.layers[-1].bias)
    assert 1 / (1 + np.exp(-bias)) == pytest.approx([0.1])
    softmax = _network(3, "softmax")
    before = keras.ops.convert_to_numpy(softmax.layers[-1].bias).copy()
    init_output_bias(softmax, _info([90, 10]))  # only a one-unit sigmoid head is touched
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(softmax.layers[-1].bias), before)


def test_class_weights_reach_the_validation_loss_too():
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((4, 2, 2, 3)), [0, 1, 1, 0])).batch(4)
    _, labels, weights = next(iter(weigh_classes(ds, {0: 0.5, 1: 10.0})))
    assert weights.numpy().tolist() == [0.5, 10.0, 10.0, 0.5]
    assert weigh_classes(ds, None) is ds
