"""Input-pipeline throughput: each data source against a naive Python-generator baseline.

Usage:
    python tests/bench_pipeline.py [--images 4000] [--image-size 64] [--repeats 3]

All sources read the same generated images. "first" is the first epoch, including
load_data's own start-up (listing and checking files); "cached" is the second epoch.
Each figure is the best of --repeats rounds. The baseline opens and resizes one image
at a time with PIL in a Python generator fed to tf.data.Dataset.from_generator, with
no caching, so its epochs cost the same.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from engine.sources import DEMO_CLASSES, make_demo_data  # noqa: E402


def epoch_rate(ds, started: float) -> tuple[float, int]:
    count = sum(int(images.shape[0]) for images, _ in ds)
    return count / (time.perf_counter() - started), count


def naive_baseline(paths, labels, cfg) -> tuple[float, float]:
    import tensorflow as tf

    def generate():
        for path, label in zip(paths, labels, strict=True):
            with Image.open(path) as image:
                image = image.convert("RGB").resize((cfg.image_size, cfg.image_size))
                yield np.asarray(image, dtype=np.float32), label

    spec = (tf.TensorSpec((cfg.image_size, cfg.image_size, 3), tf.float32),
            tf.TensorSpec((), tf.int32))  # fmt: skip
    ds = tf.data.Dataset.from_generator(generate, output_signature=spec).batch(cfg.batch_size)
    rates = [epoch_rate(ds, time.perf_counter())[0] for _ in range(2)]
    return rates[0], rates[1]


def decode_ceiling(paths) -> tuple[float, float]:
    """Parallel PNG decoding alone, nothing else: the most a first epoch can reach here."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(paths).map(
        lambda path: tf.io.decode_png(tf.io.read_file(path), channels=3),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    rate = len(paths) / _seconds(lambda: [None for _ in ds.batch(32)])
    return rate, rate


def _seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measure(cfg) -> tuple[float, float]:
    started = time.perf_counter()
    train_ds, _, info = train.load_data(cfg)
    first, count = epoch_rate(train_ds, started)
    assert count == info.train_count, (count, info.train_count)
    cached, _ = epoch_rate(train_ds, time.perf_counter())
    return first, cached


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--source-size", type=int, default=128, help="generated image size")
    parser.add_argument("--image-size", type=int, default=64, help="size the pipeline resizes to")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best of each is kept")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        print(f"generating {args.images} {args.source_size}px PNGs ...", flush=True)
        make_demo_data(root, args.images, args.source_size, seed=0)
        base = train.Config(image_size=args.image_size, batch_size=args.batch_size,
                            val_split=0.2, data_dir=str(root))  # fmt: skip
        _, _, info = train.load_data(dataclasses.replace(base, data_source="imagedir"))
        paths = sorted(str(p) for p in root.rglob("*.png"))
        labels = [DEMO_CLASSES.index(Path(p).parent.name) for p in paths]

        table = Path(tmp) / "table.csv"
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label"])
            writer.writerows(zip(paths, labels, strict=True))
        arrays = Path(tmp) / "arrays.npz"
        np.savez(arrays, images=np.stack([np.asarray(Image.open(p)) for p in paths]),
                 labels=np.array(labels))  # fmt: skip

        # Warm TensorFlow up once so no row pays its one-time start-up cost.
        measure(dataclasses.replace(base, data_source="imagedir", training_samples=64))
        # The baseline reads the training split's share of the images, like the others.
        share = paths[: info.train_count]
        share_labels = labels[: info.train_count]
        runs = {
            "naive generator (baseline)": lambda: naive_baseline(share, share_labels, base),
            "decode only (ceiling)": lambda: decode_ceiling(share),
        }
        for source, data_dir in [("imagedir", root), ("dataframe", table), ("arrays", arrays)]:
            cfg = dataclasses.replace(base, data_source=source, data_dir=str(data_dir))
            runs[source] = lambda cfg=cfg: measure(cfg)
        # Best of `repeats` rounds, the rows taking turns within each round, so a
        # passing load on the machine cannot favour one row.
        best: dict[str, tuple[float, float]] = {}
        for round_number in range(args.repeats):
            print(f"round {round_number + 1} of {args.repeats} ...", flush=True)
            for name, run in runs.items():
                first, cached = run()
                old_first, old_cached = best.get(name, (0.0, 0.0))
                best[name] = (max(first, old_first), max(cached, old_cached))
        rows = [(name, *rates) for name, rates in best.items()]
        base_first, base_cached = rows[0][1:]

    print(f"\n{info.train_count} training images, {args.source_size}px PNG -> "
          f"{args.image_size}px, batch {args.batch_size}\n")  # fmt: skip
    print("| source | first epoch (img/s) | vs baseline | cached epoch (img/s) | vs baseline |")
    print("|---|---:|---:|---:|---:|")
    for name, first, cached in rows:
        print(f"| {name} | {first:,.0f} | {first / base_first:.1f}x | {cached:,.0f} "
              f"| {cached / base_cached:.1f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
