"""The engine's source helpers that train.py's load_data only passes through: TFDS split
strings, the demo images, load_tfdata's errors.

Engine code only (tests/conftest.py:engine_config, no train.py), so not marked `example`:
a fork that replaces train.py's sources keeps these. train.load_data's sources are
tested in tests/test_data.py.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from engine.sources import download_tfds, make_demo_data, tfds_splits
from tests.conftest import engine_config


def test_tfds_splits_use_the_datasets_own_and_cut_the_rest_from_train():
    cfg = engine_config(val_split=0.2, test_split=0.1)
    # malaria: a train split only
    assert tfds_splits({"train"}, cfg) == ["train[:70%]", "train[70%:90%]", "train[90%:]"]
    assert tfds_splits({"train", "test"}, cfg) == ["train[:80%]", "train[80%:100%]", "test"]
    own = tfds_splits({"train", "validation", "test"}, cfg)
    assert own == ["train[:100%]", "validation", "test"]
    no_test = engine_config(val_split=0.2, test_split=0.0)
    assert tfds_splits({"train", "test"}, no_test) == ["train[:80%]", "train[80%:100%]"]


def test_demo_classes_differ_in_dark_spots(tmp_path):
    make_demo_data(tmp_path, 40, 48, seed=0)

    def darkest(name):  # the darkest pixel, judged by its brightest channel
        return [
            np.asarray(Image.open(p)).max(axis=2).min() for p in (tmp_path / name).glob("*.png")
        ]

    assert max(darkest("parasitized")) < 160 < min(darkest("uninfected"))


def test_load_tfdata_explains_an_unwritable_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should go")
    assert download_tfds("malaria", str(blocker / "tfdata")) == 1
    assert "cannot create" in capsys.readouterr().err


def test_load_tfdata_explains_an_unknown_dataset(tmp_path, capsys):
    assert download_tfds("no_such_dataset_xyz", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "could not download TFDS dataset 'no_such_dataset_xyz'" in err
