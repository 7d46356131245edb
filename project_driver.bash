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
# PYTHON (.venv/bin/python), RETRIES (0; see below).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON="${PYTHON:-.venv/bin/python}"
[[ -x "$PYTHON" ]] || {
    echo "error: no $PYTHON: run \`make env\` first (or set PYTHON)" >&2
    exit 2
}
MLFLOW="$(dirname "$PYTHON")/mlflow"
[[ -x "$MLFLOW" ]] || MLFLOW=mlflow

# RETRIES=N: a run that fails is tried again up to N times: resumed into the same MLflow
# run from its last checkpoint when that is on this host (checkpoints under the mounted
# STORAGE_DIR, /storage/checkpoints by default), else started over as a new run.
retries="${RETRIES:-0}"
[[ "$retries" =~ ^[0-9]+$ ]] || {
    echo "error: RETRIES must be a whole number of retries, got '$retries'" >&2
    exit 2
}
attempt=0
run_id=""
while true; do
    # Sets MLFLOW_TRACKING_URI (rewritten when DOCKER_NETWORK=bridge), project, docker_args,
    # run_args, cleanup and run_id (set when the run was created first); RETRY_OF names
    # the failed run a retry follows.
    plan="$(RETRY_OF="$run_id" RETRIES="$retries" "$PYTHON" project_driver.py plan "$@")"
    eval "$plan"
    echo "+ mlflow run $project ${docker_args[*]} ${run_args[*]}" >&2
    if [[ -z "$cleanup" && "$retries" == 0 ]]; then
        exec "$MLFLOW" run "$project" "${docker_args[@]}" "${run_args[@]}"
    fi
    status=0
    "$MLFLOW" run "$project" "${docker_args[@]}" "${run_args[@]}" || status=$?
    [[ -z "$cleanup" ]] || rm -rf "$cleanup"
    if (( status == 0 || attempt >= retries )) || [[ -z "$run_id" ]]; then
        exit "$status"
    fi
    attempt=$((attempt + 1))
    echo "run $run_id failed (exit $status): retry $attempt of $retries" >&2
done
