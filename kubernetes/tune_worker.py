"""One pod of `make kube-tune WORKERS=N`'s Indexed Job: tuning worker JOB_COMPLETION_INDEX.

MLflow's Kubernetes backend runs this file (`mlflow run -e kubernetes/tune_worker.py`)
in the project folder of the image; the study's settings come in TUNE_SETTINGS, which
host/kube.py's tune_job puts in the Job template. It is `python -m engine.tune worker
- N` with N the pod's index.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the project

from engine.tune.cli import main  # noqa: E402 (after the path it is found on)


def worker_argv(environ: dict[str, str]) -> list[str]:
    """engine.tune's arguments for this pod: worker JOB_COMPLETION_INDEX (0 outside a Job)."""
    return ["worker", "-", environ.get("JOB_COMPLETION_INDEX", "0")]


if __name__ == "__main__":
    sys.exit(main(worker_argv(dict(os.environ))))
