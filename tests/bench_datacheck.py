"""The data check on 100,000 images: cold (fingerprint everything) and warm (from the cache).

    .venv/bin/python tests/bench_datacheck.py [--images 100000] [--size 32]

Makes the images in memory: smooth random RGB images (a random 8x8 field scaled up with
a little noise), --size pixels square (default 32, the pHash's own input size, so the
figure is the search and the bookkeeping, not a resize), two classes, with planted
copies: 1% exact, 1% brightened and re-noised near copies, half of them filed under the
other class. Runs the whole check the engine runs before a split
(engine.datacheck.split_checked: fingerprints, multi-index near-duplicate search,
groups, the grouped split, the report) into a temporary cache, then again warm.
Prints seconds and what it found; the issue's target is under a minute on 2 cores.
Not a test: `make bench` runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import RunConfig  # noqa: E402 (after the path)
from engine.datacheck import split_checked  # noqa: E402


def make_images(count: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Smooth random images with planted copies; returns (images, copies planted)."""
    images = np.empty((count, size, size, 3), np.uint8)
    step = 4096
    for start in range(0, count, step):
        n = min(step, count - start)
        field = rng.integers(0, 256, (n, 8, 8, 3)).astype(np.float32)
        big = field.repeat(size // 8, axis=1).repeat(size // 8, axis=2)
        big += rng.normal(0, 3, big.shape)
        images[start : start + n] = np.clip(big, 0, 255).astype(np.uint8)
    planted = count // 100
    sources = rng.choice(count // 2, 2 * planted, replace=False)
    targets = count // 2 + rng.choice(count // 2, 2 * planted, replace=False)
    images[targets[:planted]] = images[sources[:planted]]  # exact
    jitter = rng.integers(-2, 3, (planted, size, size, 3))
    near = images[sources[planted:]].astype(np.int16) + 8 + jitter
    images[targets[planted:]] = np.clip(near, 0, 255).astype(np.uint8)
    return images, 2 * planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images, planted = make_images(args.images, args.size, rng)
    labels = rng.integers(0, 2, args.images)
    keys = [f"bench:{i}" for i in range(args.images)]
    paths = [f"bench/{i}.png" for i in range(args.images)]
    cache = tempfile.mkdtemp(prefix="bench-datacheck-")
    cfg = RunConfig(image_size=args.size, cache_dir=cache)
    shape = f"{args.size}x{args.size}x3"
    print(f"{args.images} images of {shape}, {planted} planted copies, {os.cpu_count()} cores")
    for run in ("cold", "warm"):
        started = time.perf_counter()
        _, check = split_checked(keys, paths, labels, ["a", "b"], cfg, lambda at: images[at])
        seconds = time.perf_counter() - started
        counts = check.report["counts"]
        print(
            f"{run}: {seconds:.1f} s; {counts['near_duplicate_groups']} duplicate groups, "
            f"{counts['label_conflicts']} label conflicts"
        )


if __name__ == "__main__":
    main()
