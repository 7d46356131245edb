"""Latency of the served model: a batch of base64 image files through `mlflow models serve`.

Usage:
    python tests/bench_serving.py [--batch 32] [--requests 10] [--file-size 64]
        [--network cnn|vgg16] [--image-size 64]

Trains a tiny version of the network (one epoch on demo data, in a temporary store),
starts `lifecycle.py serve` (what `make serve` runs) and POSTs `--requests` batches of
`--batch` PNG files of `--file-size` pixels as dataframe_records, after two warm-up
requests. Prints the median and best time per request and per image. The figures in
doc/serving.md come from this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from engine import client  # noqa: E402
from engine.sources import make_demo_data  # noqa: E402
from tests.conftest import tiny_config, train_and_log  # noqa: E402
from tests.servers import free_port, spawn, stop_process_group, wait_healthy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--file-size", type=int, default=64, help="pixels of the sent PNGs")
    parser.add_argument("--network", choices=["cnn", "vgg16"], default="cnn")
    parser.add_argument("--image-size", type=int, default=64, help="the model's image_size")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        network = (
            dict(convolutions=3, dense_units=128)
            if args.network == "cnn"
            else dict(convolutions=0, weights="none")
        )
        cfg = tiny_config(
            data_dir=str(root / "demo"),
            image_size=args.image_size,
            registered_model_name="bench",
            **network,
        )
        version = train_and_log(cfg).model_version
        make_demo_data(root / "files", samples=args.batch, image_size=args.file_size, seed=3)
        paths = sorted(str(p) for p in (root / "files").rglob("*.png"))[: args.batch]

        port = free_port()
        log = root / "serve.log"
        serve = ["serve", f"--model=models:/bench/{version}", f"--port={port}"]
        command = [sys.executable, str(ROOT / "lifecycle.py"), *serve]
        process = spawn(command, log, dict(os.environ))
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(f"{url}/ping", process, log, timeout=300)
            for _ in range(2):
                client.request_predictions(url, paths)
            seconds = []
            for _ in range(args.requests):
                started = time.perf_counter()
                answers = client.request_predictions(url, paths)
                seconds.append(time.perf_counter() - started)
                assert all(a["error"] is None for a in answers)
        finally:
            stop_process_group(process)
    median, best = statistics.median(seconds), min(seconds)
    print(
        f"{args.network} at {args.image_size}px, {len(paths)} PNGs of {args.file_size}px "
        f"per request, {args.requests} requests: median {median * 1000:.0f} ms per request "
        f"({median / len(paths) * 1000:.1f} ms per image), best {best * 1000:.0f} ms "
        f"({best / len(paths) * 1000:.1f} ms per image)"
    )


if __name__ == "__main__":
    main()
