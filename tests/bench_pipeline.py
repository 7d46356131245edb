"""Input-pipeline throughput: each data source against a naive Python-generator baseline.

Usage:
    python tests/bench_pipeline.py [--images 4000] [--image-size 64] [--repeats 3]
        [--scale 2000] [--scale-size 128] [--scale-only]

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

Then the scale table (--scale N, 0 to skip it): imagedir data of N and 10*N images at
--scale-size px (N distinct generated PNGs, the 10*N set made of hard links to them),
each held in memory and streamed from the disk cache (--memory-budget 1T and 0),
every cell in a child process of its own: a first run on an empty cache (cold), then
--scale-repeats runs on the filled one. Each reports its peak RSS (the child's own
VmHWM) and its epochs' img/s, in a Python loop as above and inside a tf.function (as
Keras' fit reads batches); the table keeps the largest RSS and the best rate.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import resource
import subprocess
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


# ----------------------------------------------------------------------------
# The scale table: memory and speed at N and 10*N images, in memory and streamed
# ----------------------------------------------------------------------------

BUDGETS = {"memory": "1T", "stream": "0"}


def run_cell(spec: dict) -> dict:
    """One cell, in this (child) process: load_data, a first epoch, then cached epochs."""
    cfg = train.Config(
        data_source="imagedir",
        data_dir=spec["data_dir"],
        cache_dir=spec["cache_dir"],
        image_size=spec["image_size"],
        batch_size=spec["batch_size"],
        memory_budget=spec["budget"],
        val_split=0.2,
        test_split=0.0,
    )
    started = time.perf_counter()
    train_ds, _, info = train.load_data(cfg)
    first, count = epoch_rate(train_ds, started)
    assert count == info.train_count, (count, info.train_count)
    cached = max(epoch_rate(train_ds, time.perf_counter())[0] for _ in range(spec["epochs"]))
    graph_epoch(train_ds)  # traced once
    in_graph = max(info.train_count / _seconds(lambda: graph_epoch(train_ds)) for _ in range(2))
    return {
        "graph": in_graph,
        "pipeline": info.pipeline_params["data_pipeline"],
        "first": first,
        "cached": cached,
        "rss": peak_rss(),
        "train_count": info.train_count,
    }


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, its own. (ru_maxrss is not: a
    child started by exec keeps the RSS its parent had when it forked, if larger.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@tf.function
def graph_epoch(ds: tf.data.Dataset) -> tf.Tensor:
    """One pass over ds inside a tf.function: how Keras' fit reads its batches (no Python
    between them)."""
    count = tf.constant(0, tf.int64)
    for images, _ in ds:
        count += tf.cast(tf.shape(images)[0], tf.int64)
    return count


def run_baseline_cell(spec: dict) -> dict:
    """The naive generator over a training share of the images, in this (child) process."""
    paths = sorted(str(p) for p in Path(spec["data_dir"]).rglob("*.png"))[: spec["count"]]
    labels = [DEMO_CLASSES.index(Path(p).parent.name) for p in paths]
    cfg = train.Config(image_size=spec["image_size"], batch_size=spec["batch_size"])
    return {"cached": naive_baseline(paths, labels, cfg)[2]}


def child(spec: dict) -> dict:
    """Run a cell in a fresh Python process; what it measured."""
    done = subprocess.run(
        [sys.executable, __file__, "--cell", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"cell {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_scale_data(folder: Path, count: int, size: int) -> dict[int, Path]:
    """count distinct PNGs, and a second set of 10 * count that repeats them as hard links."""
    small, large = folder / f"n{count}", folder / f"n{count * 10}"
    print(f"generating {count} {size}px PNGs for the scale table ...", flush=True)
    make_demo_data(small, count, size, seed=0)
    for name in DEMO_CLASSES:
        (large / name).mkdir(parents=True)
        for copy in range(10):
            for path in sorted((small / name).glob("*.png")):
                os.link(path, large / name / f"{copy}-{path.name}")
    return {count: small, count * 10: large}


def scale_table(args, folder: Path) -> list[str]:
    """Measure every cell of the scale table; its lines, in Markdown."""
    sets = make_scale_data(folder, args.scale, args.scale_size)
    image_bytes = args.scale_size**2 * 3
    cells: dict[tuple[int, str], dict] = {}
    for count, data_dir in sets.items():
        for pipeline, budget in BUDGETS.items():
            spec = {
                "data_dir": str(data_dir),
                "cache_dir": str(folder / f"cache-{count}-{pipeline}"),
                "image_size": args.scale_size,
                "batch_size": args.batch_size,
                "budget": budget,
                "epochs": 2,
            }
            print(f"scale: {count} images, {pipeline} ...", flush=True)
            cold = child(spec)
            warm = [child(spec) for _ in range(args.scale_repeats)]
            assert {c["pipeline"] for c in [cold, *warm]} == {pipeline}
            cells[count, pipeline] = {
                "cold_rss": cold["rss"],
                "rss": max(c["rss"] for c in warm),
                "first": max(c["first"] for c in warm),
                "cached": max(c["cached"] for c in warm),
                "graph": max(c["graph"] for c in warm),
                "train": cold["train_count"],
            }
    small = min(sets)
    share = cells[small, "memory"]["train"]
    base = {"data_dir": str(sets[small]), "count": share, "image_size": args.scale_size}
    baseline = child({**base, "batch_size": args.batch_size, "baseline": True})["cached"]
    lines = [
        "| images | decoded | pipeline | peak RSS, cold run | peak RSS, warm run | warm first "
        "epoch (img/s) | cached epoch (img/s) | vs baseline | vs in memory | cached epoch in "
        "a tf.function (img/s) | vs in memory |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (count, pipeline), cell in cells.items():
        memory = cells[count, "memory"]
        lines.append(
            f"| {count:,} | {count * image_bytes / 1e6:,.0f} MB | {pipeline} | "
            f"{cell['cold_rss'] / 1e6:,.0f} MB | {cell['rss'] / 1e6:,.0f} MB | "
            f"{cell['first']:,.0f} | {cell['cached']:,.0f} | {cell['cached'] / baseline:.0f}x | "
            f"{cell['cached'] / memory['cached']:.2f}x | {cell['graph']:,.0f} | "
            f"{cell['graph'] / memory['graph']:.2f}x |"
        )
    large = max(sets)
    lines.append(
        f"\nnaive generator baseline: {baseline:,.0f} img/s ({share} images, "
        f"{args.scale_size} px); stream peak RSS at {large:,} / {small:,} images: "
        f"{cells[large, 'stream']['rss'] / cells[small, 'stream']['rss']:.2f}x warm, "
        f"{cells[large, 'stream']['cold_rss'] / cells[small, 'stream']['cold_rss']:.2f}x cold "
        f"(in memory: {cells[large, 'memory']['rss'] / cells[small, 'memory']['rss']:.2f}x)"
    )
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--source-size", type=int, default=128, help="generated image size")
    parser.add_argument("--image-size", type=int, default=64, help="size the pipeline resizes to")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best of each is kept")
    parser.add_argument("--scale", type=int, default=2000, help="N of the scale table (0: none)")
    parser.add_argument("--scale-size", type=int, default=128, help="the scale table's px")
    parser.add_argument("--scale-repeats", type=int, default=2, help="warm runs per cell")
    parser.add_argument("--scale-only", action="store_true", help="only the scale table")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # one cell, in a child process
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.cell:
        spec = json.loads(args.cell)
        print(json.dumps(run_baseline_cell(spec) if "baseline" in spec else run_cell(spec)))
        return 0
    if not args.scale_only:
        source_table(args)
    if args.scale:
        load_before = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            lines = scale_table(args, Path(tmp))
        print_scale(lines, load_before)
    return 0


def source_table(args: argparse.Namespace) -> None:
    """Measure and print the table of sources against the baseline."""
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


def print_scale(lines: list[str], load_before: float) -> None:
    """The scale table, with the load average around it (a busy machine lowers rates)."""
    print(
        f"\nscale table: {len(os.sched_getaffinity(0))} cores, load average {load_before:.1f} "
        f"before and {os.getloadavg()[0]:.1f} after\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
