"""Faults a user hits: a full cache disk, dead writers' leftovers, link loops in a data
folder, class names that clash as metric names."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import stat
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from engine.cache import FILE_MODE, Decoded, ImageCache, load_images
from engine.common import list_images
from engine.evaluation import class_metric_names, per_class_metrics


def decoder(count: int, size: int = 64):
    """A Decode function over `count` keys: image i is filled with i % 256; counts calls."""
    calls = []

    def decode(indices: list[int]) -> Decoded:
        calls.append(list(indices))
        images = np.empty((len(indices), size, size, 3), np.uint8)
        for row, index in enumerate(indices):
            images[row] = index % 256
        return Decoded(images, np.asarray([i % 2 for i in indices], np.int64))

    keys = [f"example|{i}" for i in range(count)]
    return keys, decode, calls


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` at path (root only); skips the test where it cannot mount."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a full disk) needs root")
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
    done = subprocess.run(mount, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_cache_disk_turns_the_cache_off_for_the_run_and_leaves_no_part_shard(
    tmp_path, capsys
):
    keys, decode, _ = decoder(400)  # 400 x 64 x 64 x 3 = 4.9 MB, on a 1 MB disk
    with small_disk(tmp_path / "disk", "1m") as disk:
        out = load_images(keys, decode, cache=True, cache_dir=str(disk), shape=(64, 64, 3))
        printed = capsys.readouterr().out
        assert "cache: cannot write to" in printed and "without the disk cache" in printed
        assert len(out.images) == 400 and (out.images[:, 0, 0, 0] == np.arange(400) % 256).all()
        folder = ImageCache(disk, 64, 3).folder
        left = sorted(p.name for p in folder.iterdir() if p.name != ".lock")
        assert left == [], f"a failed write left {left}"


def test_dead_writers_leftovers_are_removed_at_the_next_write(tmp_path, capsys):
    store = ImageCache(tmp_path / "cache", 64, 3)
    keys, decode, _ = decoder(10)
    store.load(keys[:5], decode)
    orphan = store.folder / f"1-{uuid.uuid4().hex[:8]}.npy"  # an .npy whose .json never came
    orphan.write_bytes(b"\0" * 100_000)
    temporary = store.folder / ".tmp-deadbeef"
    temporary.write_bytes(b"\0" * 100_000)
    capsys.readouterr()
    store.load(keys, decode)  # 5 new keys: a write
    assert not orphan.exists() and not temporary.exists()
    shards = sorted(store.folder.glob("*.npy"))
    assert len(shards) == 2 and all(p.with_suffix(".json").exists() for p in shards)
    holds = sum(p.stat().st_size for p in store.folder.iterdir() if p.name != ".lock")
    assert f"the cache holds {holds / 1e6:.1f} MB" in capsys.readouterr().out


def test_cache_files_are_group_readable_so_containers_of_one_group_share_them(tmp_path):
    store = ImageCache(tmp_path / "cache", 64, 3)
    keys, decode, calls = decoder(4)
    store.load(keys, decode)
    for path in store.folder.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        want = 0o666 if path.name == ".lock" else FILE_MODE
        assert mode == want, f"{path.name}: {oct(mode)}"
    assert stat.S_IMODE(store.folder.stat().st_mode) == 0o2775
    assert len(calls) == 1


def test_a_cache_this_user_cannot_write_is_read_or_skipped_without_a_traceback(tmp_path, capsys):
    keys, decode, calls = decoder(6)
    cache = tmp_path / "cache"
    load_images(keys[:3], decode, cache=True, cache_dir=str(cache), shape=(64, 64, 3))
    folder = ImageCache(cache, 64, 3).folder
    # A file in the cache's place of a shard folder: nothing can be written there.
    (folder / ".lock").unlink()
    (folder / ".lock").mkdir()
    out = load_images(keys, decode, cache=True, cache_dir=str(cache), shape=(64, 64, 3))
    assert "decoding without it" in capsys.readouterr().out
    assert (out.images[:, 0, 0, 0] == np.arange(6)).all()


# ----------------------------------------------------------------------------
# Listing a data folder: links
# ----------------------------------------------------------------------------


def touch_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not decoded here")


def test_a_link_loop_lists_each_file_once_and_says_how_many_links_it_skipped(tmp_path):
    touch_images(tmp_path / "a", ["1.png", "2.png"])
    touch_images(tmp_path / "a" / "sub", ["3.jpg"])
    (tmp_path / "a" / "loop").symlink_to(".")
    (tmp_path / "a" / "sub" / "back").symlink_to("..")
    (tmp_path / "a" / "alias").symlink_to("sub")
    (tmp_path / "a" / "same.png").symlink_to("1.png")
    listing = list_images(tmp_path / "a")
    real = [str(tmp_path / "a" / n) for n in ("1.png", "2.png", "sub/3.jpg")]
    assert listing.files == real
    assert (listing.loops, listing.outside) == (4, 0)
    assert "skipped 4 link(s)" in listing.describe_skipped(tmp_path / "a")


def test_a_link_out_of_the_class_folder_is_not_followed_unless_asked(tmp_path):
    touch_images(tmp_path / "a", ["1.png"])
    touch_images(tmp_path / "b", ["2.png", "3.png"])
    (tmp_path / "a" / "up").symlink_to("..")  # would hand b's files the label a
    (tmp_path / "a" / "b.png").symlink_to(tmp_path / "b" / "2.png")
    listing = list_images(tmp_path / "a")
    assert listing.files == [str(tmp_path / "a" / "1.png")]
    assert listing.outside == 2 and "leading out of" in listing.describe_skipped(tmp_path / "a")
    followed = list_images(tmp_path / "a", follow_links_out=True)
    assert str(tmp_path / "a" / "b.png") in followed.files and len(followed.files) == 2


def test_a_plain_folder_lists_every_image_and_skips_nothing(tmp_path):
    touch_images(tmp_path / "x", ["b.PNG", "a.jpeg", "notes.txt"])
    listing = list_images(tmp_path / "x")
    assert [Path(p).name for p in listing.files] == ["a.jpeg", "b.PNG"]
    assert listing.describe_skipped(tmp_path / "x") == ""


# ----------------------------------------------------------------------------
# Per-class metric names
# ----------------------------------------------------------------------------


def test_class_names_that_clash_as_metric_names_get_a_suffix_and_keep_their_metrics():
    classes = ["cats\u2215dogs", "cats_dogs", "cats_dogs_2"]
    names = class_metric_names(classes)
    assert len(set(names.values())) == 3
    assert names["cats_dogs"] == "cats_dogs" and names["cats_dogs_2"] == "cats_dogs_2"
    assert names["cats\u2215dogs"].startswith("cats_dogs_")
    labels = np.array([0, 1, 2, 2])
    probs = np.eye(3)[[0, 1, 2, 1]]
    scores = per_class_metrics(labels, probs, classes)
    assert len(scores) == 6  # precision and recall of each of the three classes
    assert scores[f"recall_{names['cats_dogs_2']}"] == 0.5


# ----------------------------------------------------------------------------
# Decoding: EXIF orientation, and a pixel limit checked before decoding
# ----------------------------------------------------------------------------


def saved_with_orientation(path: Path, pixels: np.ndarray, orientation: int) -> Path:
    """pixels saved so that a viewer honouring EXIF `orientation` shows them upright."""
    from PIL import Image

    undo = {
        1: None,
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    image = Image.fromarray(pixels)
    stored = image if orientation == 1 else image.transpose(undo[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif.tobytes())
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_every_image_upright_as_a_viewer_shows_it(tmp_path, orientation):
    from PIL import Image, ImageOps

    from engine.decoding import decode_files

    upright = np.random.default_rng(orientation).integers(0, 255, (24, 40, 3), np.uint8)
    path = saved_with_orientation(tmp_path / "photo.png", upright, orientation)
    assert (np.asarray(ImageOps.exif_transpose(Image.open(path))) == upright).all()
    plain = tmp_path / "plain.png"
    Image.fromarray(upright).save(plain)
    images, failures = decode_files([str(path), str(plain)], 16, 3)
    assert failures == {}
    np.testing.assert_array_equal(images[0], images[1])


def test_a_sideways_phone_jpeg_is_trained_and_served_upright(tmp_path):
    import tensorflow as tf

    from engine.decoding import decode_files, decode_image

    upright = np.zeros((60, 100, 3), np.uint8)
    upright[:, :50] = 255  # white left half, black right half: easy to see turned
    path = saved_with_orientation(tmp_path / "phone.jpg", upright, 6)
    images, _ = decode_files([str(path)], 32, 3)
    assert images[0, :, :12].mean() > 200 and images[0, :, -12:].mean() < 50
    # a fork's own pipeline through decode_image reads the orientation itself
    alone = decode_image(tf.constant(str(path)), 32, 3).numpy()
    np.testing.assert_array_equal(alone, images[0])


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    from PIL import Image

    from engine.decoding import decode_files

    big = tmp_path / "bomb.png"
    Image.new("L", (20000, 20000)).save(big)  # ~400 KB on disk, 400 megapixels decoded
    assert big.stat().st_size < 1_000_000
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(small)
    images, failures = decode_files([str(big), str(small)], 16, 3)
    assert list(failures) == [0] and "over the limit of 100 megapixels" in failures[0]
    assert (images[1] == 9).all()
    monkeypatch.setenv("IMAGE_MAX_MEGAPIXELS", "0.00001")  # 10 pixels: both refused
    _, failures = decode_files([str(big), str(small)], 16, 3)
    assert sorted(failures) == [0, 1]
    monkeypatch.setenv("IMAGE_MAX_MEGAPIXELS", "lots")
    with pytest.raises(Exception, match="IMAGE_MAX_MEGAPIXELS='lots' is not a number"):
        decode_files([str(small)], 16, 3)


# ----------------------------------------------------------------------------
# Which model answers: a fork's data against the demo's model
# ----------------------------------------------------------------------------


def test_predict_warns_when_the_input_class_folders_are_not_the_models_classes(tmp_path):
    from engine.prediction import class_folder_warnings

    touch_images(tmp_path / "pets" / "cat", ["1.png"])
    touch_images(tmp_path / "pets" / "dog", ["2.png"])
    (tmp_path / "pets" / "empty").mkdir()
    warnings = class_folder_warnings([str(tmp_path / "pets")], ["parasitized", "uninfected"])
    assert len(warnings) == 1 and "[cat, dog]" in warnings[0] and "--model" in warnings[0]
    assert class_folder_warnings([str(tmp_path / "pets")], ["cat", "dog"]) == []
    assert class_folder_warnings([str(tmp_path / "pets" / "cat")], ["a", "b"]) == []


def test_a_missing_champion_says_to_run_make_validate_not_to_train(tracking_store):
    import mlflow

    from engine.config import UserError
    from engine.registry import resolve_model

    client = mlflow.MlflowClient()
    client.create_registered_model("demo-model")
    version = client.create_model_version("demo-model", source="file:///nowhere", run_id=None)
    client.set_registered_model_alias("demo-model", "candidate", version.version)
    with pytest.raises(UserError, match="make validate") as caught:
        resolve_model("champion", "demo-model")
    assert "Train one" not in str(caught.value)
    with pytest.raises(UserError, match="Train one"):
        resolve_model("champion", "no-such-model")


# ----------------------------------------------------------------------------
# A tracking server that dies mid-run and stays down
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_server_that_dies_mid_run_ends_it_in_bounded_time_and_it_resumes_later(
    tmp_path, monkeypatch
):
    """Long because it is one story: the server dies, the run ends with the fix, the server
    comes back, and the same run resumes and registers."""
    import time

    import keras
    import mlflow

    from engine.tracking import TrackingLost
    from tests.conftest import tiny_config, train_and_log
    from tests.servers import MlflowServer

    server = MlflowServer(
        f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts"), tmp_path / "log"
    ).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    # a smaller budget than the template's, so the test is quick; the path is the same
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

    class KillServer(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                server.stop()

    cfg = tiny_config(
        data_dir=str(tmp_path / "demo"),
        epochs=3,
        checkpoint_dir=str(tmp_path / "checkpoints"),
        system_metrics=False,
    )
    import train
    from engine import training

    started = time.monotonic()
    try:
        with pytest.raises(TrackingLost) as caught:
            training.run_training(
                cfg, train.load_data, train.define_network, callbacks=[KillServer()]
            )
        took = time.monotonic() - started
        message = str(caught.value)
        run_id = message.split("during run ")[1].split(" ")[0]
        assert "stopped answering" in message and "Nothing was registered" in message
        assert f"--resume-run-id {run_id}" in message
        assert took < 180, f"the run hung {took:.0f} s after the server died"
        assert (tmp_path / "checkpoints" / run_id).is_dir()

        server.start()  # back, on the same port and store
        client = mlflow.MlflowClient(server.url)
        assert client.search_model_versions("name = 'tiny-classifier'") == []
        assert client.get_run(run_id).info.status == "RUNNING"
        resumed = train_and_log(
            tiny_config(
                data_dir=str(tmp_path / "demo"),
                resume_run_id=run_id,
                checkpoint_dir=str(tmp_path / "checkpoints"),
            )
        )
        assert resumed.run_id == run_id and resumed.model_version == "1"
        assert client.get_run(run_id).info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run_id, "val_loss"))
        assert steps == [1, 2, 3]
    finally:
        server.stop()


def test_a_lost_server_ends_train_py_with_one_paragraph_and_exit_1(monkeypatch, capsys):
    import train
    from engine import cli, training
    from engine.tracking import TrackingLost

    def lost(*args, **kwargs):
        raise TrackingLost("the tracking server at http://x stopped answering during run r1")

    monkeypatch.setattr(training, "run_training", lost)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # put back as it was after the test
    code = cli.main(train.Config, train.load_data, train.define_network, ["--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "error: the tracking server" in err and "Traceback" not in err
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        assert os.environ.get(name), f"{name}: the template's retry budget is not set"


def test_a_forks_run_cannot_add_its_classes_to_the_demos_registered_model(tracking_store, tmp_path):
    import mlflow

    from engine.config import UserError
    from engine.sources import make_demo_data
    from tests.conftest import tiny_config, train_and_log

    client = mlflow.MlflowClient()
    experiment = client.create_experiment("demo-runs")
    demo_run = client.create_run(experiment)
    client.log_param(demo_run.info.run_id, "class_names", "parasitized,uninfected")
    client.create_registered_model("tiny-classifier")
    client.create_model_version("tiny-classifier", "file:///nowhere", demo_run.info.run_id)
    for name in ("cat", "dog"):
        make_demo_data(tmp_path / "pets" / name, 12, 32, seed=len(name))
        for image in (tmp_path / "pets" / name).rglob("*.png"):
            image.rename(tmp_path / "pets" / name / image.name)
    cfg = tiny_config(data_source="imagedir", data_dir=str(tmp_path / "pets"))
    runs_before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(UserError) as caught:
        train_and_log(cfg)
    message = str(caught.value)
    assert "[parasitized, uninfected]" in message and "[cat, dog]" in message
    assert "--registered-model-name" in message and "--allow-class-change" in message
    assert len(mlflow.search_runs(search_all_experiments=True)) == runs_before
    assert train_and_log(dataclasses.replace(cfg, allow_class_change=True)).model_version == "2"
    versions = client.search_model_versions("name = 'tiny-classifier'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
