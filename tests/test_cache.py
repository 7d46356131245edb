"""The decoded-image cache: warm runs decode nothing, edits are noticed, runs share it safely."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from engine import cache as image_cache
from engine.cache import ImageCache, clean
from engine.config import UserError
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def load(data_dir, cache_dir, capsys=None, **overrides):
    """load_data on an imagedir; returns (all its images, info, what it printed)."""
    cfg = tiny_config(
        data_source="imagedir",
        data_dir=str(data_dir),
        cache_dir=str(cache_dir),
        val_split=0.25,
        **overrides,
    )
    train_ds, val_ds, info = train.load_data(cfg)
    splits = (train_ds, val_ds) if info.test_ds is None else (train_ds, val_ds, info.test_ds)
    images = np.concatenate([x.numpy() for ds in splits for x, _ in ds])
    printed = capsys.readouterr().out if capsys else ""
    return images, info, printed


def sorted_images(images: np.ndarray) -> np.ndarray:
    """The images in an order that does not depend on the shuffle."""
    return images[np.lexsort(images.reshape(len(images), -1).T)]


def test_a_second_run_reads_the_cache_and_decodes_nothing(demo_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    cold, info, printed = load(demo_dir, cache, capsys)
    assert "cache: wrote 48 images" in printed and "(48 decoded)" in printed
    warm, warm_info, printed = load(demo_dir, cache, capsys)
    assert f"cache: read 48 decoded images from {cache}" in printed
    assert "(0 decoded)" in printed and "wrote" not in printed
    assert (warm_info.train_count, warm_info.val_count) == (info.train_count, info.val_count)
    assert warm.dtype == np.uint8
    np.testing.assert_array_equal(sorted_images(warm), sorted_images(cold))


def test_a_changed_file_is_decoded_again_and_a_now_corrupt_one_reported(demo_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    load(demo_dir, cache, capsys)
    changed = sorted((demo_dir / "uninfected").glob("*.png"))[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(changed)  # a pure red cell: easy to find
    os.utime(changed, ns=(1, 1))  # a different mtime even on coarse clocks
    images, _, printed = load(demo_dir, cache, capsys)
    assert "cache: read 47 decoded images" in printed and "(1 decoded)" in printed
    red = np.all(images == [255, 0, 0], axis=(1, 2, 3))
    assert red.sum() == 1

    corrupt = sorted((demo_dir / "parasitized").glob("*.png"))[0]
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # cut off: a truncated PNG
    _, info, printed = load(demo_dir, cache, capsys)
    assert "(1 decoded)" in printed
    assert info.skipped_files == [str(corrupt)]
    assert f"skipped 1 unreadable image file(s):\n  {corrupt}: " in printed


def test_added_and_removed_files(demo_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    load(demo_dir, cache, capsys)
    Image.new("RGB", (40, 40), (0, 0, 255)).save(demo_dir / "parasitized" / "new.png")
    _, info, printed = load(demo_dir, cache, capsys)
    assert info.train_count + info.val_count + info.test_count == 49
    assert "cache: read 48 decoded images" in printed and "(1 decoded)" in printed
    for old in sorted((demo_dir / "uninfected").glob("*.png"))[:3]:
        old.unlink()
    _, info, printed = load(demo_dir, cache, capsys)
    assert info.train_count + info.val_count + info.test_count == 46
    assert "cache: read 46 decoded images" in printed and "(0 decoded)" in printed


def test_the_skipped_files_report_is_the_same_warm_and_cold(demo_dir, tmp_path, capsys):
    (demo_dir / "uninfected" / "notes.png").write_text("field notes, not an image")
    (demo_dir / "parasitized" / "empty.jpg").write_bytes(b"")
    cache = tmp_path / "cache"
    _, cold, cold_printed = load(demo_dir, cache, capsys)
    _, warm, warm_printed = load(demo_dir, cache, capsys)
    assert "(0 decoded)" in warm_printed
    assert sorted(Path(p).name for p in cold.skipped_files) == ["empty.jpg", "notes.png"]
    assert warm.skipped_files == cold.skipped_files

    def report(text):
        return text[text.index("warning: skipped") :]

    assert report(warm_printed) == report(cold_printed)
    assert "skipped 2 unreadable image file(s)" in warm_printed


def write_odd_images(folder: Path) -> list[str]:
    """Files that real folders hold; each must decode or be reported."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "plain.png")
    Image.fromarray((rng.integers(0, 65535, (24, 24))).astype(np.uint16)).save(folder / "deep.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).save(folder / "photo.webp")
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray(rgb).convert("RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb).save(
        folder / "anim.gif", save_all=True, append_images=[Image.fromarray(255 - rgb)]
    )
    truncated = (folder / "plain.png").read_bytes()
    (folder / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    (folder / "text.png").write_text("not an image at all")
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("channels", [1, 3])
def test_odd_files_either_decode_or_are_reported(tmp_path, capsys, channels):
    names = write_odd_images(tmp_path / "data" / "odd")
    Image.new("RGB", (24, 24), 50).save(tmp_path / "data" / "plain.png")
    (tmp_path / "data" / "other").mkdir()
    Image.new("RGB", (24, 24), 90).save(tmp_path / "data" / "other" / "a.png")
    Image.new("RGB", (24, 24), 90).save(tmp_path / "data" / "other" / "b.png")
    images, info, printed = load(tmp_path / "data", tmp_path / "cache", capsys, channels=channels)
    skipped = sorted(Path(p).name for p in info.skipped_files)
    assert {"text.png", "truncated.png"} <= set(skipped)
    assert len(images) + len(skipped) == len(names) + 2  # none dropped without a word
    assert all(f"{name}: " in printed for name in skipped)  # each with its reason
    assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, channels)


def test_two_runs_started_together_share_one_cache(demo_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    script = (
        "import sys, train; from tests.conftest import tiny_config; "
        f"cfg = tiny_config(data_source='imagedir', data_dir={str(demo_dir)!r}, "
        f"cache_dir={str(cache)!r}); t, v, info = train.load_data(cfg); "
        "n = sum(len(y) for ds in (t, v, info.test_ds) for _, y in ds); print('images', n)"
    )
    command = [sys.executable, "-c", script]
    runs = [
        subprocess.Popen(
            command, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    printed = "".join(out for out, _ in outputs)
    assert printed.count("images 48") == 2
    assert printed.count("cache: wrote 48 images") == 1  # one decoded; the other read it
    # the cache is whole: every shard loads, and a third run decodes nothing
    store = ImageCache(cache, 32, 3)
    for meta in store.folder.glob("*.json"):
        keys = json.loads(meta.read_text())["keys"]
        assert np.load(meta.with_suffix(".npy")).shape == (len(keys), 32, 32, 3)
    assert not list(store.folder.glob(".tmp-*"))
    _, _, printed = load(demo_dir, cache, capsys)
    assert "cache: read 48 decoded images" in printed and "(0 decoded)" in printed


def test_mostly_changed_shards_are_rewritten_and_the_cache_cleaned(demo_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    load(demo_dir, cache, capsys)
    store = ImageCache(cache, 32, 3)
    first_shards = {p.name for p in store.folder.glob("*.json")}
    for i, path in enumerate(sorted(demo_dir.rglob("*.png"))[:30]):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(path)
        os.utime(path, ns=(i + 1, i + 1))
    _, _, printed = load(demo_dir, cache, capsys)
    assert "cache: read 18 decoded images" in printed and "(30 decoded)" in printed
    shards = {p.name for p in store.folder.glob("*.json")}
    assert not shards & first_shards  # the old shard held 30 stale of 48: rewritten
    entries = sum(len(json.loads((store.folder / s).read_text())["keys"]) for s in shards)
    assert entries == 48
    _, _, printed = load(demo_dir, cache, capsys)
    assert "(0 decoded)" in printed

    assert clean(str(cache)) == 0
    assert not list(store.folder.glob("*.npy"))
    _, _, printed = load(demo_dir, cache, capsys)
    assert "(48 decoded)" in printed


def test_cache_off_writes_nothing(demo_dir, tmp_path, capsys):
    images, _, printed = load(demo_dir, tmp_path / "cache", capsys, cache=False)
    assert len(images) == 48 and images.dtype == np.uint8
    assert not (tmp_path / "cache").exists() and "cache:" not in printed


def test_an_unwritable_cache_dir_is_a_user_error(demo_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match="--cache-dir"):
        load(demo_dir, blocker / "cache")


def test_tfds_goes_through_the_cache(tmp_path, capsys):
    # tensorflow_datasets takes seconds to import; only this test needs it
    import tensorflow_datasets as tfds

    cfg = tiny_config(
        data_source="tfds",
        dataset="malaria",
        data_dir=str(tmp_path),
        cache_dir=str(tmp_path / "cache"),
        training_samples=20,
        validation_samples=6,
    )
    with tfds.testing.mock_data(num_examples=50):
        cold_train, _, _ = train.load_data(cfg)
        printed = capsys.readouterr().out
        assert "(20 decoded)" in printed and "(6 decoded)" in printed
        warm_train, _, info = train.load_data(cfg)
    printed = capsys.readouterr().out
    assert printed.count("(0 decoded)") == 3 and "wrote" not in printed  # train, val, test
    cold = np.concatenate([x.numpy() for x, _ in cold_train])
    warm = np.concatenate([x.numpy() for x, _ in warm_train])
    assert warm.dtype == np.uint8 and warm.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(sorted_images(warm), sorted_images(cold))
    labels = np.concatenate([y.numpy() for _, y in warm_train])
    assert set(labels) <= {0, 1} and info.train_count == 20


def test_an_unwritable_default_cache_turns_the_cache_off(demo_dir, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(image_cache, "default_cache_dir", lambda: blocker / "cache")
    images, info, printed = load(demo_dir, "", capsys)
    assert len(images) == 48 and "decoding without it" in printed
