"""Input-pipeline throughput: each data source against a naive Python-generator baseline.

Usage:
    python tests/bench_pipeline.py [--images 4000] [--image-size 64] [--repeats 3]

All sources read the same generated images. For each source:
  cold    the first epoch of a first run: load_data with an empty decoded-image
          cache (listing, decoding, checking and caching every file) and one pass;
  warm    the first epoch of a second run: load_data reading the filled cache;
  cached  a later epoch of that run, from memory.
The tfds source reads a small TFDS dataset written here from the same PNGs (no
download). The arrays source is in memory already and has no disk cache, so its
cold and warm runs do the same work. Each figure is the best of --repeats rounds, the
rows taking turns within a round. The baseline opens and resizes one image at a time
with PIL in a Python generator fed to tf.data.Dataset.from_generator, with no
caching, so its epochs cost the same. The last line is the imagedir summary.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from engine.decoding import decode_files  # noqa: E402
from engine.sources import DEMO_CLASSES, make_demo_data  # noqa: E402

FEED_RATE = 43_000  # img/s the default network trains at on an H200 in bfloat16 (issue 9)


def epoch_rate(ds, started: float) -> tuple[float, int]:
    count = sum(int(images.shape[0]) for images, _ in ds)
    return count / (time.perf_counter() - started), count


def naive_baseline(paths, labels, cfg) -> tuple[float, float, float]:
    def generate():
        for path, label in zip(paths, labels, strict=True):
            with Image.open(path) as image:
                image = image.convert("RGB").resize((cfg.image_size, cfg.image_size))
                yield np.asarray(image, dtype=np.float32), label

    spec = (
        tf.TensorSpec((cfg.image_size, cfg.image_size, 3), tf.float32),
        tf.TensorSpec((), tf.int32),
    )
    ds = tf.data.Dataset.from_generator(generate, output_signature=spec).batch(cfg.batch_size)
    first, later = (epoch_rate(ds, time.perf_counter())[0] for _ in range(2))
    return first, first, later


def decode_ceiling(paths) -> tuple[float, float, float]:
    """Parallel PNG decoding alone, nothing else: the most a cold first epoch can reach here."""
    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda path: tf.io.decode_png(tf.io.read_file(path), channels=3),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    rate = len(paths) / _seconds(lambda: [None for _ in ds.batch(32)])
    return rate, rate, rate


def _seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measure(cfg, cache_dir: Path) -> tuple[float, float, float]:
    """(cold first epoch, warm first epoch, cached epoch) img/s, cache_dir empty at first."""
    cfg = dataclasses.replace(cfg, cache_dir=str(cache_dir))
    rates = []
    for _ in range(2):  # a first run on the empty cache, then a second run
        started = time.perf_counter()
        train_ds, _, info = train.load_data(cfg)
        rate, count = epoch_rate(train_ds, started)
        assert count == info.train_count, (count, info.train_count)
        rates.append(rate)
    cached, _ = epoch_rate(train_ds, time.perf_counter())
    return rates[0], rates[1], cached


def write_tfds(root: Path, paths: list[str], labels: list[int], data_dir: Path) -> str:
    """A TFDS dataset of the PNGs (encoded as they are), prepared into data_dir; its name."""
    # tensorflow_datasets takes seconds to import; only this step needs it
    import tensorflow_datasets as tfds

    class BenchCells(tfds.core.GeneratorBasedBuilder):
        """The benchmark's PNG cells as a TFDS dataset."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            image = tfds.features.Image(shape=(None, None, 3), encoding_format="png")
            label = tfds.features.ClassLabel(names=list(DEMO_CLASSES))
            features = tfds.features.FeaturesDict({"image": image, "label": label})
            return tfds.core.DatasetInfo(
                builder=self, features=features, supervised_keys=("image", "label")
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for path, label in zip(paths, labels, strict=True):
                yield path, {"image": path, "label": label}

    BenchCells(data_dir=str(data_dir)).download_and_prepare()
    return BenchCells.name


def write_sources(folder: Path, images: int, source_size: int):
    """The same generated PNGs in every source's form: a folder of class folders, a table,
    an arrays file and a TFDS dataset.

    Returns:
        (paths, labels, {source: its data_dir}, the TFDS dataset's name).
    """
    root = folder / "images"
    print(f"generating {images} {source_size}px PNGs ...", flush=True)
    make_demo_data(root, images, source_size, seed=0)
    paths = sorted(str(p) for p in root.rglob("*.png"))
    labels = [DEMO_CLASSES.index(Path(p).parent.name) for p in paths]
    table = folder / "table.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(zip(paths, labels, strict=True))
    arrays = folder / "arrays.npz"
    pixels = np.stack([np.asarray(Image.open(p)) for p in paths])
    np.savez(arrays, images=pixels, labels=np.array(labels))
    tfds_dir = folder / "tfds"
    print("writing them as a TFDS dataset ...", flush=True)
    tfds_name = write_tfds(root, paths, labels, tfds_dir)
    data_dirs = {"imagedir": root, "dataframe": table, "arrays": arrays, "tfds": tfds_dir}
    return paths, labels, data_dirs, tfds_name


def print_report(args, info, best, cache_bytes: float, per_core: float, load_before: float):
    """The table of rates and ratios to the baseline, the cache size and the summary line."""
    cores = len(os.sched_getaffinity(0))
    # Other work on the cores slows the parallel rows more than the one-thread baseline:
    # read the ratios of a run on a busy machine as low.
    print(
        f"\n{info.train_count} training images, {args.source_size}px PNG -> "
        f"{args.image_size}px, batch {args.batch_size}, {cores} cores, load average "
        f"{load_before:.1f} before the bench and {os.getloadavg()[0]:.1f} after\n"
    )
    print(
        "| source | cold first epoch (img/s) | vs baseline | warm first epoch (img/s) "
        "| vs baseline | cached epoch (img/s) | vs baseline |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_rates = best["naive generator (baseline)"]
    for name, rates in best.items():
        ratios = zip(rates, base_rates, strict=True)
        cells = [f"{rate:,.0f} | {rate / ref:.1f}x" for rate, ref in ratios]
        print(f"| {name} | {' | '.join(cells)} |")
    print(
        f"\ncache for the imagedir data: {cache_bytes / 1e6:.1f} MB "
        f"({args.images} images at {args.image_size}px)"
    )
    print(
        f"loader at 128 px (decode + resize + check, cold): {per_core:,.0f} img/s per core; "
        f"{FEED_RATE:,} img/s takes {FEED_RATE / per_core:.0f} cores"
    )
    cold, warm, cached = (r / b for r, b in zip(best["imagedir"], base_rates, strict=True))
    print(
        f"summary: cold first epoch {cold:.1f}x, warm first epoch {warm:.1f}x, "
        f"cached epoch {cached:.1f}x"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--source-size", type=int, default=128, help="generated image size")
    parser.add_argument("--image-size", type=int, default=64, help="size the pipeline resizes to")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best of each is kept")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        paths, labels, data_dirs, tfds_name = write_sources(
            Path(tmp), args.images, args.source_size
        )
        base = train.Config(
            image_size=args.image_size,
            batch_size=args.batch_size,
            val_split=0.2,
            test_split=0.0,  # the split doc/benchmarks.md describes
            data_dir=str(data_dirs["imagedir"]),
        )
        caches = Path(tmp) / "caches"
        _, _, info = train.load_data(
            dataclasses.replace(base, data_source="imagedir", cache_dir=str(caches / "info"))
        )
        # Warm TensorFlow up once so no row pays its one-time start-up cost.
        warm_up = dataclasses.replace(base, data_source="imagedir", training_samples=64)
        measure(warm_up, caches / "warm-up")
        # The baseline reads the training split's share of the images, like the others.
        share, share_labels = paths[: info.train_count], labels[: info.train_count]
        runs = {
            "naive generator (baseline)": lambda _: naive_baseline(share, share_labels, base),
            "decode only (ceiling)": lambda _: decode_ceiling(share),
        }
        for source, data_dir in data_dirs.items():
            cfg = dataclasses.replace(
                base, data_source=source, data_dir=str(data_dir), dataset=tfds_name
            )
            runs[source] = lambda cache_dir, cfg=cfg: measure(cfg, cache_dir)
        best: dict[str, tuple[float, ...]] = {}
        for round_number in range(args.repeats):
            print(f"round {round_number + 1} of {args.repeats} ...", flush=True)
            for name, run in runs.items():
                rates = run(caches / f"{name.split()[0]}-{round_number}")
                best[name] = tuple(map(max, zip(rates, best.get(name, (0.0,) * 3), strict=True)))
        imagedir_cache = (caches / "imagedir-0").rglob("*")
        cache_bytes = sum(p.stat().st_size for p in imagedir_cache if p.is_file())

        seconds = min(_seconds(lambda: decode_files(share, 128, 3)) for _ in range(args.repeats))
        per_core = len(share) / seconds / cores

    print_report(args, info, best, cache_bytes, per_core, load_before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
