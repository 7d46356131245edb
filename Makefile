# Every target has a "## what it does" comment: `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Extra flags for train.py, e.g. make train ARGS="--epochs 3 --data-source imagedir --data-dir /some/dir"
ARGS ?=
# Where `make load_tfdata` puts the TFDS data (train.py's default --data-dir for tfds).
TFDS_DIR ?= /storage/tfdata
DATASET ?= malaria

.PHONY: help env lock quickstart train tune ui load_tfdata mlproject test test-no-docker test-fast lint format bench cache-clean clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

# .venv holds exactly lock/dev.txt, every package pinned with its hash (lock/env.sh).
# The stamp is rebuilt when a lock or a requirements file changes; requirements the locks
# were not made from stop here, naming `make lock`. INSTALLER=pip installs the same
# lock with pip instead of uv; VENV=/some/path builds the environment elsewhere.
INSTALLER ?= uv
$(VENV)/.installed: lock/dev.txt lock/uv.txt lock/uv.in requirements.txt tests/requirements.txt tracking_server/requirements.txt
	@bash lock/env.sh install $(VENV) $(PYTHON) $(INSTALLER)

env: $(VENV)/.installed ## create .venv from the lock (lock/dev.txt, hashes checked) in seconds

lock: ## regenerate lock/ from the requirements files (needs the registry; UPGRADE=1 moves every unpinned package to its newest)
	@bash lock/env.sh lock $(VENV) $(PYTHON) $(if $(UPGRADE),--upgrade)

quickstart: $(VENV)/.installed ## train a small CNN on offline demo data, log and register it locally
	$(BIN)/python train.py --data-source demo --image-size 64 --convolutions 3 \
		--epochs 6 --batch-size 32 --learning-rate 0.002 --experiment-name quickstart $(ARGS)

train: $(VENV)/.installed ## run train.py locally with ARGS="--flag value ..."
	$(BIN)/python train.py $(ARGS)

tune: $(VENV)/.installed ## search hyperparameters (tune.yaml) with pruning: ARGS="--trials 20 --workers 2 --epochs 8"
	$(BIN)/python -m engine.tune train $(ARGS)

.PHONY: label-audit
label-audit: $(VENV)/.installed ## likely label errors among the training images, by K-fold: ARGS="--data-source demo --folds 5 --epochs 3"
	$(BIN)/python lifecycle.py label-audit $(ARGS)

# make ui PORT=5050 when 5000 is taken (make server uses MLFLOW_PORT, also 5000).
PORT ?= 5000
ui: $(VENV)/.installed ## browse the local tracking store (mlflow.db, mlruns/) on http://127.0.0.1:5000 (PORT=... for another)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(PORT)

load_tfdata: $(VENV)/.installed ## download the TFDS dataset DATASET (default malaria) into TFDS_DIR
	$(BIN)/python -c "import sys; from engine import sources; sys.exit(sources.download_tfds('$(DATASET)', '$(TFDS_DIR)'))"

mlproject: $(VENV)/.installed ## rewrite MLproject's main entry point from train.Config (after adding a knob)
	$(BIN)/python -m engine.mlproject train:Config

# With Docker installed, make test also starts a Docker engine (as root), builds the
# training image several times (a few GB, minutes) and moves its :latest tag; make
# test-no-docker leaves Docker alone.
test: $(VENV)/.installed ## run the whole suite (Docker and PostgreSQL tests skip with a reason where missing)
	$(BIN)/python -m pytest $(ARGS)

test-no-docker: $(VENV)/.installed ## the whole suite but the Docker tests
	$(BIN)/python -m pytest -m "not docker" $(ARGS)

test-fast: $(VENV)/.installed ## run the fast tier: no Docker, no PostgreSQL, nothing marked slow (minutes)
	$(BIN)/python -m pytest -m "not slow and not docker and not postgres" $(ARGS)

lint: $(VENV)/.installed ## check code style with ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed ## reformat the code with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(VENV)/.installed ## measure input-pipeline throughput against a naive baseline
	$(BIN)/python tests/bench_pipeline.py $(ARGS)
	$(BIN)/python tests/bench_datacheck.py

# CACHE_DIR=... names another cache than the default (train.py's --cache-dir).
CACHE_DIR ?=
cache-clean: $(VENV)/.installed ## empty the decoded-image cache (default /storage/cache or ./.cache/images)
	$(BIN)/python -c "import sys; from engine import cache; sys.exit(cache.clean('$(CACHE_DIR)'))"

clean: ## remove caches and generated demo data (keeps .venv and the tracking store)
	rm -rf .pytest_cache .ruff_cache data/demo
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

# ---- Docker (see doc/docker.md; project_driver.py is the door, host/ the code) ----
# The image tag is written once, in MLproject's docker_env; host/image.py reads it.
# BASE_IMAGE=... builds on another base than the Dockerfile's TensorFlow GPU image.
BASE_IMAGE ?=
# EXPERIMENT=name: the MLflow experiment of make run (else MLFLOW_EXPERIMENT_NAME or Default).
EXPERIMENT ?=
# VERSION=commit|branch|tag [GIT_URL=url]: make run and sweep run that version of the code
# (a fresh checkout; without GIT_URL, of this folder's repository).
GIT_URL ?=
VERSION ?=
VERSION_ARGS = $(if $(GIT_URL),--git-url $(GIT_URL)) $(if $(VERSION),--version $(VERSION))
# RETRIES=N: make run and sweep try a failed run again up to N times, resuming it from
# its checkpoint (under STORAGE_DIR, /storage by default) into the same MLflow run.
RETRIES ?= 0
# WORKERS=N: make run starts N containers and make kube-run N pods that train one model
# together (MultiWorkerMirroredStrategy) into one MLflow run; see doc/kubernetes.md.
WORKERS ?= 1

.PHONY: build run sweep tune-docker kube-run test-docker
.PHONY: kube-tune

# The code's commit and content hash are baked in (labels, .code_identity.json) and the
# image gets a second tag per code version, NAME:code-<hash>; see doc/docker.md.
build: $(VENV)/.installed ## build the training image for the code here (tag from MLproject; BASE_IMAGE=... overrides the base)
	BASE_IMAGE=$(BASE_IMAGE) $(BIN)/python project_driver.py build

# run and sweep check the tracking server first, so a server that is down fails in
# seconds, then build the image for the code they run (seconds when only code changed),
# and start `mlflow run` through one launcher (host/launch.py), which does the retries.
# ./project_driver.bash is the same run in plain bash, its `mlflow run` there to read.
run: $(VENV)/.installed ## train in the image via mlflow run (needs MLFLOW_TRACKING_URI; ARGS="-P epochs=3"; VERSION=sha; WORKERS=N containers train one model)
	BASE_IMAGE=$(BASE_IMAGE) RETRIES=$(RETRIES) WORKERS=$(WORKERS) $(BIN)/python project_driver.py run $(VERSION_ARGS) \
		$(if $(EXPERIMENT),--experiment-name $(EXPERIMENT)) $(ARGS)

sweep: $(VENV)/.installed ## run a grid in the image, several at once: ARGS="-P epochs=1,2 -P learning_rate=0.001,0.01"
	BASE_IMAGE=$(BASE_IMAGE) RETRIES=$(RETRIES) $(BIN)/python project_driver.py sweep $(VERSION_ARGS) \
		$(if $(EXPERIMENT),--experiment-name $(EXPERIMENT)) $(ARGS)

tune-docker: $(VENV)/.installed ## make tune with each worker a container on its own GPU (needs a tracking server; ARGS as make tune)
	BASE_IMAGE=$(BASE_IMAGE) $(BIN)/python project_driver.py tune $(ARGS)

# MLflow's Kubernetes backend builds FROM the image above with the project folder
# added and pushes it; a worktree of HEAD keeps .venv and data out of that copy, and
# the image is built from that worktree so that its baked code is the code copied.
# WORKERS=N (N > 1): an Indexed Job of N pods training one model together under a
# headless Service (host/kube.py renders both; doc/kubernetes.md).
kube-run: $(VENV)/.installed ## run the committed code as a Kubernetes Job (kubernetes/kubernetes_config.json; WORKERS=N: N pods train one model)
	@tmp="$$(mktemp -d)" && src="$$tmp/src" && \
	config="$$($(BIN)/python -m host.kube config --workers '$(WORKERS)' --out "$$tmp/kube")" && \
	git worktree add --detach --quiet "$$src" HEAD && \
	trap 'git worktree remove --force "$$src"' EXIT && \
	$(BIN)/python -m host.kube service --workers '$(WORKERS)' && \
	BASE_IMAGE=$(BASE_IMAGE) $(BIN)/python project_driver.py build --project-dir "$$src" && \
	$(BIN)/mlflow run "$$src" --backend kubernetes \
		--backend-config "$$config" --build-image \
		$(if $(EXPERIMENT),--experiment-name $(EXPERIMENT)) $(ARGS)

# make kube-tune WORKERS=N ARGS="--storage postgresql://USER@HOST/DB --trials 40 --epochs 8":
# N pods of one Indexed Job pull trials from one Optuna study on the team PostgreSQL, under
# one parent MLflow run (host/tune.py; doc/tuning.md). The code is HEAD's, as kube-run's.
kube-tune: $(VENV)/.installed ## tune on Kubernetes: WORKERS=N pods pull trials from one study on PostgreSQL (ARGS="--storage postgresql://... --trials 20")
	@tmp="$$(mktemp -d)" && src="$$tmp/src" && \
	git worktree add --detach --quiet "$$src" HEAD && \
	trap 'git worktree remove --force "$$src"' EXIT && \
	BASE_IMAGE=$(BASE_IMAGE) $(BIN)/python -m host.tune --workers '$(WORKERS)' \
		--src "$$src" --out "$$tmp/kube" $(ARGS)

test-docker: $(VENV)/.installed ## the Docker tests: builds the image, runs make run against a real server (minutes)
	$(BIN)/python -m pytest -m docker $(ARGS)
# ---- end Docker ----

# ---- Tracking server and model lifecycle ----
# See doc/tracking_server.md and doc/serving.md. MODEL picks a registered model version:
# models:/NAME@ALIAS, models:/NAME/VERSION, or a bare alias or version of MODEL_NAME.
MLFLOW_PORT ?= 5000
MODEL_NAME ?= image-classifier
MODEL ?= models:/$(MODEL_NAME)@champion
SERVE_PORT ?= 5001

.PHONY: server server-stop validate predict serve tf-serving reap-runs stack-secrets stack-up stack-down test-server

server: $(VENV)/.installed ## start a local MLflow server on 127.0.0.1:5000 (SQLite + proxied artifacts)
	MLFLOW_PORT=$(MLFLOW_PORT) tracking_server/local_server.sh start

server-stop: ## stop exactly the server `make server` started
	MLFLOW_PORT=$(MLFLOW_PORT) tracking_server/local_server.sh stop

validate: $(VENV)/.installed ## evaluate a model version on held-out data, move `champion` if it wins (ARGS=...)
	$(BIN)/python lifecycle.py validate $(ARGS)

predict: $(VENV)/.installed ## classify image files with MODEL, write a CSV: ARGS="--input DIR_OR_FILES --output preds.csv"
	$(BIN)/python lifecycle.py predict --model "$(MODEL)" $(ARGS)

serve: $(VENV)/.installed ## serve MODEL on 127.0.0.1:5001: base64 image files in, class names out (lifecycle.py request IMAGE)
	$(BIN)/python lifecycle.py serve --model "$(MODEL)" --port $(SERVE_PORT) $(ARGS)

tf-serving: $(VENV)/.installed ## write MODEL as a TF Serving SavedModel: ARGS="--output DIR --version N"
	$(BIN)/python lifecycle.py export --model "$(MODEL)" $(ARGS)

reap-runs: $(VENV)/.installed ## mark runs whose process died as FAILED (ARGS="--stale-minutes 60")
	$(BIN)/python lifecycle.py reap-runs $(ARGS)

# RUN=<run id> reproduces that run instead of MODEL's. A run made in the image is trained
# again in the image rebuilt from its commit (set MLFLOW_TRACKING_URI, as for make run).
RUN ?=
.PHONY: reproduce
reproduce: $(VENV)/.installed ## train MODEL's run again from its record (commit, params, data) and say if the figures come back (RUN=id; ARGS="--tolerance 0.01")
	$(BIN)/python lifecycle.py reproduce $(if $(RUN),--run "$(RUN)",--model "$(MODEL)") $(ARGS)

# stack_secrets.py needs only the standard library, so these two run with the host's
# python3 ($(PYTHON)): a Docker host needs no .venv. stack-up checks before Docker runs.
stack-secrets: ## write tracking_server/.env with fresh random secrets (mode 0600; keeps an existing one)
	@$(PYTHON) tracking_server/stack_secrets.py generate tracking_server/.env

stack-up: ## start the team server (MLflow + PostgreSQL + MinIO); refuses missing, example or weak secrets
	@$(PYTHON) tracking_server/stack_secrets.py check tracking_server/.env
	docker compose -f tracking_server/compose.yaml up -d --build --wait

stack-down: ## stop the team server (its data stays in named volumes)
	docker compose -f tracking_server/compose.yaml down

test-server: $(VENV)/.installed ## only the tracking-server and lifecycle tests (real PostgreSQL, S3, MLflow)
	$(BIN)/python -m pytest tests/test_tracking_server.py tests/test_lifecycle.py $(ARGS)
# ---- end tracking server ----
