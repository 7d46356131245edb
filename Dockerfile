# The training image that `make build` makes and `make run` (mlflow run) starts.
# Layers go from slowest-changing to fastest: the TensorFlow base, git, the
# locked Python packages, the user, and last the project code, so editing
# train.py rebuilds only the final COPY (seconds).
#
# BASE_IMAGE overrides the base, for example a CPU image or a local one:
#   docker build --build-arg BASE_IMAGE=python:3.11-slim -t NAME .
# The tag itself is written once, in MLproject's docker_env; `make build` adds a
# second tag per code version, NAME:code-<content hash> (project_driver.py build).
ARG BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu
FROM ${BASE_IMAGE}

# GIT_PYTHON_REFRESH=quiet: the project folder in the image has no .git (the
# commit is baked in below, and `mlflow run` tags it on the run from the host), so
# GitPython's warnings would be noise.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    GIT_PYTHON_REFRESH=quiet \
    TF_CPP_MIN_LOG_LEVEL=2

# MLflow records source versions with git; install it where the base lacks it.
# MLproject's command says `python`: make sure the name exists on any base.
RUN command -v git >/dev/null || { \
        apt-get update && apt-get install -y --no-install-recommends git \
        && rm -rf /var/lib/apt/lists/*; } \
    && { command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python; }

# The runtime lock (lock/runtime.txt, which `make lock` makes from requirements.txt):
# every package pinned with its hash, at the versions .venv has, so the image and the
# local environment cannot drift. On the TensorFlow base, tensorflow==2.21.0 (the lock's
# version: tests/test_lock.py checks) and every package already at its locked version
# are kept; the others are installed from the lock. The base's own packages are listed
# first, so that a run names only what was installed beside base and lock
# (engine/environment.py, the env.* tags).
ENV BASE_IMAGE_PACKAGES=/etc/base-image-packages.txt
COPY lock/runtime.txt /tmp/runtime.txt
RUN { python3 -m pip list --format=freeze >"${BASE_IMAGE_PACKAGES}" 2>/dev/null || true; } \
    && python3 -m pip install --require-hashes --no-deps -r /tmp/runtime.txt \
    && rm /tmp/runtime.txt

# Train as a non-root user. project_driver.bash runs the container with the
# caller's uid:gid (or this user's when the caller is root), so files written to
# mounted folders such as /storage belong to the caller. HOME and the code
# folder are writable by any uid (Keras, matplotlib and TFDS keep caches there).
ARG USER_UID=1000
RUN useradd --create-home --non-unique --uid "${USER_UID}" trainer \
    && chmod 1777 /home/trainer \
    && mkdir -p /mlflow/projects/code && chmod 1777 /mlflow/projects/code
ENV HOME=/home/trainer

# mlflow run starts the entry point in this folder (MLflow's own convention,
# the same path `mlflow run --build-image` uses). .dockerignore keeps .venv,
# data, tracking stores and tests out.
WORKDIR /mlflow/projects/code
COPY --chown=${USER_UID}:${USER_UID} . .

# The code's identity, which `make build` (project_driver.py build) hashes on the host
# and passes in: `bake` hashes the copied files the same way, stops the build if they
# differ, and writes .code_identity.json, which every run checks against the commit
# it is tagged with (engine/provenance.py; doc/docker.md). The base is labelled too: the
# driver rebuilds on the same one. Last, so that a new commit with the same code
# rebuilds only these two steps.
ARG BASE_IMAGE
ARG CODE_COMMIT=unknown
ARG CODE_DIRTY=true
ARG CODE_CONTENT_HASH=
ARG CODE_IMAGE=
LABEL code.commit="${CODE_COMMIT}" code.dirty="${CODE_DIRTY}" \
      code.content_hash="${CODE_CONTENT_HASH}" build.base_image="${BASE_IMAGE}"
RUN python -m engine.provenance bake --commit "${CODE_COMMIT}" --dirty "${CODE_DIRTY}" \
        --content-hash "${CODE_CONTENT_HASH}" --image "${CODE_IMAGE}"
USER trainer
