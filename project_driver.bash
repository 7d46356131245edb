#!/usr/bin/env bash
# One training run of this project in its Docker image (what `make run` does, in plain
# bash: the `mlflow run` it starts is here to read or change):
#
#   ./project_driver.bash [mlflow run options...]
#   ./project_driver.bash -P epochs=3 -P data_source=demo --experiment-name trials
#   ./project_driver.bash --git-url URL --version SHA -P epochs=3   # a version from git
#
# `project_driver.py plan --print0` checks that MLFLOW_TRACKING_URI answers, builds the
# image for the code that runs (seconds when only code changed; the image knows its
# code, and the run checks it), and decides the docker args (GPU, network for the
# tracking server, user, /storage, a local artifact folder), one line per decision on
# stderr. On stdout it hands over data, never code: NUL-separated, the tracking URI (a
# loopback one rewritten when DOCKER_NETWORK=bridge), a checkout folder to remove at
# the end (or ""), and the arguments of `mlflow`. This script runs that once.
# Your options go last, so `-P name=value`, `--experiment-name`, `--run-name` or
# `-A name=value` pass through (a -A you give replaces the driver's choice for that
# name). --git-url and --version are the driver's: it runs a fresh checkout of that
# version (a version alone: this folder's repository).
# Settings (environment): MLFLOW_TRACKING_URI, GPUS (auto|none|all|device=N),
# DOCKER_NETWORK (auto|host|bridge), STORAGE_DIR (/storage), BASE_IMAGE (the Dockerfile's),
# PYTHON (.venv/bin/python), MLFLOW (the mlflow beside PYTHON), RETRIES (0; see below).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || {
    echo "error: no $PYTHON: run \`make env\` first (or set PYTHON)" >&2
    exit 2
}
MLFLOW="${MLFLOW:-$(dirname "$PYTHON")/mlflow}"
[[ -x "$MLFLOW" ]] || MLFLOW=mlflow
export MLFLOW

# RETRIES=N: a run that fails is tried again up to N times: resumed into the same MLflow
# run from its last checkpoint when that is on this host (checkpoints under the mounted
# STORAGE_DIR, /storage/checkpoints by default), else started over as a new run. The
# launcher behind `make run` does that, for one run or a sweep: hand the run over to it.
if [[ "${RETRIES:-0}" != 0 ]]; then
    exec "$PYTHON" project_driver.py run "$@"
fi

plan_file="$(mktemp)"
"$PYTHON" project_driver.py plan --print0 "$@" >"$plan_file" || {
    status=$?
    rm -f "$plan_file"
    exit "$status"
}
mapfile -d '' plan <"$plan_file"
rm -f "$plan_file"
export MLFLOW_TRACKING_URI="${plan[0]}"
cleanup="${plan[1]}"
mlflow_args=("${plan[@]:2}") # run PROJECT -A name=value ... your options [--run-id ID]

echo "+ mlflow ${mlflow_args[*]}" >&2
if [[ -z "$cleanup" ]]; then
    exec "$MLFLOW" "${mlflow_args[@]}"
fi
status=0
"$MLFLOW" "${mlflow_args[@]}" || status=$?
rm -rf "$cleanup"
exit "$status"
