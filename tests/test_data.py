"""Every data source on tiny generated data: shapes, dtypes, classes, counts, and bad input."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
from PIL import Image

import train
from engine.config import UserError
from engine.sources import make_demo_data
from tests.conftest import tiny_config

pytestmark = pytest.mark.example


def first_batch(ds):
    images, labels = next(iter(ds))
    return images.numpy(), labels.numpy()


def all_labels(ds) -> np.ndarray:
    return np.concatenate([y.numpy() for _, y in ds])


def check_pipeline(ds, cfg, expect_labels):
    images, labels = first_batch(ds)
    assert images.dtype == np.uint8
    assert images.shape[1:] == (cfg.image_size, cfg.image_size, cfg.channels)
    assert images.shape[0] <= cfg.batch_size
    assert images.min() >= 0 and images.max() <= 255 and images.max() > 1
    assert labels.dtype == np.int32
    assert set(labels) <= set(expect_labels)


def write_image(path, size, mode="RGB", color=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


@pytest.fixture
def mixed_dir(tmp_path):
    """Three classes; PNG and JPEG, RGB and grayscale, different sizes."""
    root = tmp_path / "mixed"
    for c, name in enumerate(["ant", "bee", "wasp"]):
        for i in range(5):
            write_image(root / name / f"{i}.png", (20 + i, 30), "RGB", (40 * c, 10, 200))
            write_image(root / name / f"g{i}.jpg", (50, 40 + i), "L", 60 * c)
    return root


def test_imagedir_binary(demo_dir):
    cfg = tiny_config(data_source="imagedir", data_dir=str(demo_dir), val_split=0.25)
    train_ds, val_ds, info = train.load_data(cfg)
    assert info.class_names == ["parasitized", "uninfected"]
    # 24 per class: 10% test (2), 25% validation (6), the rest training, in each class
    assert (info.train_count, info.val_count, info.test_count) == (32, 12, 4)
    assert info.class_counts == {"train": [16, 16], "val": [6, 6], "test": [2, 2]}
    assert info.image_shape == (32, 32, 3)
    check_pipeline(train_ds, cfg, {0, 1})
    assert len(all_labels(train_ds)) == 32 and len(all_labels(val_ds)) == 12
    assert np.bincount(all_labels(info.test_ds)).tolist() == [2, 2]


def test_imagedir_many_classes_sizes_formats_and_grayscale(mixed_dir):
    cfg = tiny_config(data_source="imagedir", data_dir=str(mixed_dir), channels=1, val_split=0.2)
    train_ds, val_ds, info = train.load_data(cfg)
    assert info.class_names == ["ant", "bee", "wasp"]
    assert info.train_count + info.val_count + info.test_count == 30
    check_pipeline(train_ds, cfg, {0, 1, 2})
    labels = np.concatenate([all_labels(train_ds), all_labels(val_ds), all_labels(info.test_ds)])
    assert np.bincount(labels).tolist() == [10, 10, 10]


def test_split_is_seeded_and_sample_caps_apply(demo_dir):
    cfg = tiny_config(
        data_source="imagedir", data_dir=str(demo_dir), training_samples=10, validation_samples=4
    )
    _, val_a, info = train.load_data(cfg)
    _, val_b, _ = train.load_data(cfg)
    assert (info.train_count, info.val_count) == (10, 4)
    np.testing.assert_array_equal(first_batch(val_a)[0], first_batch(val_b)[0])


def test_corrupt_and_non_image_files_are_skipped_and_reported(demo_dir, capsys):
    (demo_dir / "uninfected" / "broken.png").write_bytes(b"\x89PNG not really")
    (demo_dir / "uninfected" / "notes.jpg").write_text("field notes, not an image")
    (demo_dir / "parasitized" / "README.txt").write_text("ignored: not an image extension")
    cfg = tiny_config(data_source="imagedir", data_dir=str(demo_dir))
    train_ds, val_ds, info = train.load_data(cfg)
    assert sorted(p.rsplit("/", 1)[1] for p in info.skipped_files) == ["broken.png", "notes.jpg"]
    assert "skipped 2 unreadable image file(s)" in capsys.readouterr().out
    seen = [len(all_labels(ds)) for ds in (train_ds, val_ds, info.test_ds)]
    assert sum(seen) == 48


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist: give a folder with one sub-folder of images per class"),
        ("empty", "has no class sub-folders"),
        ("loose", "move them into one sub-folder per class"),
        ("empty_class", "class folder(s) empty in"),
        ("one_class", "found only one class (only)"),
        ("all_corrupt", "class(es) bad have no readable images"),
    ],
)
def test_imagedir_bad_layouts(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "loose":
        write_image(root / "a.png", (8, 8))
    if layout == "empty_class":
        write_image(root / "full" / "a.png", (8, 8))
        (root / "empty").mkdir()
    if layout == "one_class":
        write_image(root / "only" / "a.png", (8, 8))
    if layout == "all_corrupt":
        write_image(root / "good" / "a.png", (8, 8))
        (root / "bad").mkdir()
        (root / "bad" / "x.png").write_text("nope")
    with pytest.raises(UserError) as caught:
        train.load_data(tiny_config(data_source="imagedir", data_dir=str(root)))
    assert message in str(caught.value)


def test_imagedir_needs_a_data_dir():
    with pytest.raises(UserError, match="--data-dir is required"):
        train.load_data(tiny_config(data_source="imagedir", data_dir=""))


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_dataframe_table(mixed_dir, tmp_path, fmt):
    rows = [
        {"file": str(p.relative_to(tmp_path)), "species": p.parent.name}
        for p in sorted(mixed_dir.rglob("*.*"))
    ]
    table = tmp_path / f"query.{fmt}"
    if fmt == "csv":
        with open(table, "w", newline="") as f:
            writer = csv.DictWriter(f, ["file", "species"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        table.write_text(json.dumps(rows))
    cfg = tiny_config(
        data_source="dataframe", data_dir=str(table), path_column="file", label_column="species"
    )
    train_ds, _, info = train.load_data(cfg)
    assert info.class_names == ["ant", "bee", "wasp"]
    assert info.train_count + info.val_count + info.test_count == 30
    check_pipeline(train_ds, cfg, {0, 1, 2})


def test_dataframe_paths_relative_to_a_sub_folder_and_absolute(mixed_dir, tmp_path):
    # "../mixed/ant/0.png" from tables/, an absolute path, and "./" all name real files,
    # once each, normalised (the cache key and the logged table use these paths)
    files = sorted(mixed_dir.rglob("*.*"))
    (tmp_path / "tables").mkdir()
    table = tmp_path / "tables" / "query.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for i, p in enumerate(files):
            shown = [f"../{p.relative_to(tmp_path)}", str(p), f"./../{p.relative_to(tmp_path)}"]
            writer.writerow([shown[i % 3], p.parent.name])
    _, _, info = train.load_data(tiny_config(data_source="dataframe", data_dir=str(table)))
    logged = info.lineage["table"]["path"]
    assert sorted(logged) == sorted(map(str, files))


def test_dataframe_numeric_labels_sort_as_numbers(tmp_path):
    rows = []
    for label in (2, 10):
        for i in range(4):
            write_image(tmp_path / f"{label}_{i}.png", (8, 8), color=label * 10)
            rows.append({"path": f"{label}_{i}.png", "label": label})
    (tmp_path / "t.json").write_text(json.dumps(rows))
    _, _, info = train.load_data(
        tiny_config(data_source="dataframe", data_dir=str(tmp_path / "t.json"))
    )
    assert info.class_names == ["2", "10"]


def test_dataframe_errors(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("image,label\nmissing.png,a\n")
    with pytest.raises(UserError, match="has no column .path.; its columns are image, label"):
        train.load_data(tiny_config(data_source="dataframe", data_dir=str(table)))
    with pytest.raises(UserError, match="1 image path.s. in .* do not exist"):
        train.load_data(
            tiny_config(data_source="dataframe", data_dir=str(table), path_column="image")
        )


def make_arrays(count=40, size=12, gray=False):
    rng = np.random.default_rng(0)
    shape = (count, size, size) if gray else (count, size, size, 3)
    return rng.integers(0, 256, shape).astype(np.uint8), np.arange(count) % 2


def test_arrays_npz_with_class_names(tmp_path):
    images, labels = make_arrays()
    np.savez(tmp_path / "d.npz", images=images, labels=labels, class_names=np.array(["no", "yes"]))
    cfg = tiny_config(data_source="arrays", data_dir=str(tmp_path / "d.npz"))
    train_ds, val_ds, info = train.load_data(cfg)
    assert info.class_names == ["no", "yes"]
    assert info.train_count + info.val_count + info.test_count == 40
    check_pipeline(train_ds, cfg, {0, 1})


def test_arrays_hdf5_one_hot_gray_float(tmp_path):
    images, labels = make_arrays(gray=True)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["x"] = images.astype(np.float32) / 255.0  # floats in 0..1 are scaled to 0..255
        f["y"] = np.eye(2)[labels]
    cfg = tiny_config(data_source="arrays", data_dir=str(tmp_path / "d.h5"))
    train_ds, _, info = train.load_data(cfg)
    assert info.class_names == ["0", "1"]
    check_pipeline(train_ds, cfg, {0, 1})


def test_arrays_errors(tmp_path):
    np.savez(tmp_path / "d.npz", pixels=np.zeros((4, 8, 8)))
    with pytest.raises(UserError, match="needs arrays named images and labels"):
        train.load_data(tiny_config(data_source="arrays", data_dir=str(tmp_path / "d.npz")))
    (tmp_path / "d.txt").write_text("")
    with pytest.raises(UserError, match="reads .npz, .h5 or .hdf5"):
        train.load_data(tiny_config(data_source="arrays", data_dir=str(tmp_path / "d.txt")))


def test_tfds_with_mock_data(tmp_path):
    # tensorflow_datasets takes seconds to import; only this test needs it
    import tensorflow_datasets as tfds

    cfg = tiny_config(
        data_source="tfds",
        dataset="malaria",
        data_dir=str(tmp_path),
        training_samples=20,
        validation_samples=6,
    )
    with tfds.testing.mock_data(num_examples=50):
        train_ds, val_ds, info = train.load_data(cfg)
        assert info.class_names == ["parasitized", "uninfected"]
        assert (info.train_count, info.val_count) == (20, 6)
        check_pipeline(train_ds, cfg, {0, 1})
        assert len(all_labels(train_ds)) == 20
        assert len(all_labels(val_ds)) == 6
        # (mock_data gives num_examples for any split, slices too)
        assert info.test_count == 50 == len(all_labels(info.test_ds))
        assert sum(info.class_counts["train"]) == 20 and sum(info.class_counts["val"]) == 6
        assert info.lineage["name"].startswith("tfds:malaria:")


def test_tfds_missing_data_says_how_to_download(tmp_path):
    cfg = tiny_config(data_source="tfds", dataset="malaria", data_dir=str(tmp_path / "none"))
    with pytest.raises(UserError, match="make load_tfdata DATASET=malaria"):
        train.load_data(cfg)


def test_demo_data_is_deterministic_and_cached(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_demo_data(a, 6, 24, seed=3)
    make_demo_data(b, 6, 24, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 6
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()
    cfg = tiny_config(data_dir=str(tmp_path / "demo"), demo_samples=10)
    _, _, info = train.load_data(cfg)
    stamp = (tmp_path / "demo" / "demo.json").stat().st_mtime_ns
    _, _, again = train.load_data(cfg)
    assert (tmp_path / "demo" / "demo.json").stat().st_mtime_ns == stamp, "regenerated needlessly"
    for loaded in (info, again):
        assert loaded.train_count + loaded.val_count + loaded.test_count == 10
    _, _, more = train.load_data(tiny_config(data_dir=str(tmp_path / "demo"), demo_samples=20))
    assert more.train_count + more.val_count + more.test_count == 20


def test_dataframe_json_in_column_layout(demo_dir, tmp_path):
    files = sorted(demo_dir.rglob("*.png"))
    columns = {"path": [str(p) for p in files], "label": [p.parent.name for p in files]}
    (tmp_path / "cols.json").write_text(json.dumps(columns))
    _, _, info = train.load_data(
        tiny_config(data_source="dataframe", data_dir=str(tmp_path / "cols.json"))
    )
    assert info.class_names == ["parasitized", "uninfected"]
    assert info.train_count + info.val_count + info.test_count == 48
    columns["label"].pop()
    (tmp_path / "cols.json").write_text(json.dumps(columns))
    with pytest.raises(UserError, match="its columns have different lengths"):
        train.load_data(tiny_config(data_source="dataframe", data_dir=str(tmp_path / "cols.json")))
