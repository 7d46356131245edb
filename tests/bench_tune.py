"""Tuned search against a grid of as many points run to the end, on the demo data.

    .venv/bin/python tests/bench_tune.py [--epochs 6] [--workers 2] [--only grid|tuned]

Both go through `python -m engine.tune` with the same workers, data and epochs, into a
throw-away tracking store: the grid is its points queued into a study with no pruner
(learning_rate x convolutions), the tuned search samples the same ranges with TPE and
the median pruner. Prints, for each: trials, epochs trained in all, best val_loss and
the val_accuracy of that trial's best epoch, and wall time.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

from engine import tune  # noqa: E402 (the project folder is on sys.path only now)

GRID = {"learning_rate": [1e-4, 1e-3, 1e-2], "convolutions": [1, 2]}


def measure(name: str, flags: list[str], storage: str, experiment: str) -> dict:
    """Run one study through tune.main; its row of the table."""
    started = time.time()
    assert tune.main(["train", "--study-name", name, "--storage", storage, *flags]) == 0
    seconds = time.time() - started
    client = mlflow.MlflowClient()
    runs = client.search_runs(
        [mlflow.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"tags.`tune.study` = '{name}'",
    )
    children = [r for r in runs if "tune.trial" in r.data.tags]
    epochs = sum(len(client.get_metric_history(r.info.run_id, "val_loss")) for r in children)
    study = optuna.load_study(study_name=name, storage=tune.open_storage(storage))
    best_run = client.get_run(study.best_trial.user_attrs["mlflow_run_id"])
    return {
        "search": name,
        "trials": len(children),
        "epochs trained": epochs,
        "pruned": sum(r.data.tags.get("tune.pruned") == "true" for r in children),
        "best val_loss": round(study.best_value, 4),
        "its val_accuracy": round(best_run.data.metrics["best_val_accuracy"], 4),
        "wall s": round(seconds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=["grid", "tuned"], help="run one of the two")
    parser.add_argument("--prune-after", default="0", help="tune's --prune-after (0: default)")
    args = parser.parse_args()
    points = [dict(zip(GRID, values, strict=True)) for values in itertools.product(*GRID.values())]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        storage = f"{tmp}/studies.journal"
        common = shlex.split(
            f"--workers {args.workers} --trials {len(points)} --space '' "
            "--param learning_rate=1e-4:1e-2:log --param convolutions=1,2 "
            "--data-source demo --demo-samples 200 --image-size 32 "
            f"--epochs {args.epochs} --dense-units 32 --registered-model-name '' "
            "--export-savedmodel false --experiment-name bench-tune"
        )
        common += ["--data-dir", f"{tmp}/demo"]
        rows = []
        if args.only != "tuned":
            grid = optuna.create_study(study_name="grid", storage=tune.open_storage(storage))
            for point in points:
                grid.enqueue_trial(point)
            rows.append(measure("grid", [*common, "--pruner", "none"], storage, "bench-tune"))
        if args.only != "grid":
            flags = [*common, "--pruner", "median", "--prune-after", args.prune_after]
            rows.append(measure("tuned", flags, storage, "bench-tune"))
    print("\n| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
