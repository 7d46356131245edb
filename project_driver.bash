#!/usr/bin/env bash
# One training run of this project in its Docker image (make run):
#
#   ./project_driver.bash [mlflow run options...]
#   ./project_driver.bash -P epochs=3 -P data_source=demo --experiment-name trials
#   ./project_driver.bash --git-url URL --version SHA -P epochs=3   # a version from git
#
# project_driver.py checks that MLFLOW_TRACKING_URI answers, builds the image for the
# code that runs (seconds when only code changed; the image knows its code, and the run
# checks it), and decides the docker args (GPU, network for the tracking server, user,
# /storage, a local artifact folder), printing one line per decision; then this script
# runs `mlflow run` on that image. Your options go last, so `-P name=value`,
# `--experiment-name`, `--run-name` or `-A name=value` pass through (a -A you give
# replaces the driver's choice for that name). --git-url and --version are the driver's:
# it runs a fresh checkout of that version (a version alone: this folder's repository).
# Settings (environment): MLFLOW_TRACKING_URI, GPUS (auto|none|all|device=N),
# DOCKER_NETWORK (auto|host|bridge), STORAGE_DIR (/storage), BASE_IMAGE (the Dockerfile's),
# PYTHON (.venv/bin/python).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || {
    echo "error: no $PYTHON: run \`make env\` first (or set PYTHON)" >&2
    exit 2
}
MLFLOW="$(dirname "$PYTHON")/mlflow"
[[ -x "$MLFLOW" ]] || MLFLOW=mlflow

# Sets MLFLOW_TRACKING_URI (rewritten when DOCKER_NETWORK=bridge), project, docker_args,
# run_args and cleanup (a checkout to remove at the end).
plan="$("$PYTHON" project_driver.py plan "$@")"
eval "$plan"

echo "+ mlflow run $project ${docker_args[*]} ${run_args[*]}" >&2
if [[ -z "$cleanup" ]]; then
    exec "$MLFLOW" run "$project" "${docker_args[@]}" "${run_args[@]}"
fi
trap 'rm -rf "$cleanup"' EXIT
"$MLFLOW" run "$project" "${docker_args[@]}" "${run_args[@]}"
