#!/usr/bin/env bash
# One training run of this project in its Docker image (make run):
#
#   ./project_driver.bash [mlflow run options...]
#   ./project_driver.bash -P epochs=3 -P data_source=demo --experiment-name trials
#
# project_driver.py decides the docker args (GPU, network for the tracking server,
# user, /storage) and checks that MLFLOW_TRACKING_URI answers, printing one line per
# decision; then this script runs `mlflow run .` on the image named in MLproject's
# docker_env (built by `make build`, code included). Your options go last, so
# `-P name=value`, `--experiment-name`, `--run-name` or `-A name=value` pass through
# (a -A you give replaces the driver's choice for that name).
# Settings (environment): MLFLOW_TRACKING_URI, GPUS (auto|none|all|device=N),
# DOCKER_NETWORK (auto|host|bridge), STORAGE_DIR (/storage), PYTHON (.venv/bin/python).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || {
    echo "error: no $PYTHON: run \`make env\` first (or set PYTHON)" >&2
    exit 2
}
MLFLOW="$(dirname "$PYTHON")/mlflow"
[[ -x "$MLFLOW" ]] || MLFLOW=mlflow

# Sets MLFLOW_TRACKING_URI (rewritten when DOCKER_NETWORK=bridge) and docker_args.
plan="$("$PYTHON" project_driver.py plan "$@")"
eval "$plan"

echo "+ mlflow run . ${docker_args[*]} $*" >&2
exec "$MLFLOW" run . "${docker_args[@]}" "$@"
