"""Minority-class recall on a 95/5 binary set: class_weight none against balanced.

    .venv/bin/python tests/bench_imbalance.py [--seeds 1 2 3]

Makes 2,000 synthetic cells (1,900 uninfected, 100 parasitized) once in a temporary
folder, trains the small CNN on each seed with each setting into a throwaway local
tracking store, and prints the test split's per-class recall. Minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-imbalance-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    # Imported after the flags are parsed: --help answers without loading TensorFlow.
    import train
    from engine.sources import make_demo_data
    from engine.training import run_training

    data = work / "cells"
    make_demo_data(data, 3800, image_size=32, seed=3)
    for extra in sorted((data / "parasitized").glob("*.png"))[100:]:
        extra.unlink()  # 100 parasitized of 2,000: 5%
    rows = []
    for seed in args.seeds:
        for weight in ("none", "balanced"):
            cfg = dataclasses.replace(
                train.Config(),
                data_source="imagedir",
                data_dir=str(data),
                image_size=32,
                convolutions=2,
                dense_units=16,
                epochs=6,
                batch_size=64,
                learning_rate=0.002,
                randomize_images=False,
                class_weight=weight,
                seed=seed,
                experiment_name="imbalance",
                registered_model_name="",
                export_savedmodel=False,
                system_metrics=False,
            )
            scores = run_training(cfg, train.load_data, train.define_network).test_metrics
            rows.append((seed, weight, scores))
    print("\n| seed | class_weight | minority recall | majority recall | balanced acc. | acc. |")
    print("|---|---|---|---|---|---|")
    for seed, weight, s in rows:
        print(
            f"| {seed} | {weight} | {s['test_recall_parasitized']:.3f} | "
            f"{s['test_recall_uninfected']:.3f} | {s['test_balanced_accuracy']:.3f} | "
            f"{s['test_accuracy']:.3f} |"
        )


if __name__ == "__main__":
    main()
