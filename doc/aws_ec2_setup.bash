#!/usr/bin/env bash
# Set up a fresh Ubuntu GPU instance to train with this template (doc/aws_ec2_install.md).
#
#   REPO_URL=https://github.com/<you>/py_tf2_gpu_dock_mlflow.git bash aws_ec2_setup.bash
#   DRY_RUN=1 REPO_URL=... bash aws_ec2_setup.bash     # print what it would do
#
# Meant for the "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04)", which
# already has the NVIDIA driver, Docker and the NVIDIA Container Toolkit; on a plain
# Ubuntu 22.04/24.04 image it installs Docker and the toolkit (the driver needs
# `sudo ubuntu-drivers install` and a reboot first). Every step checks before it acts,
# so running it again is safe.
#
# Settings (environment): REPO_URL (required unless CHECKOUT exists), CHECKOUT
# (~/py_tf2_gpu_dock_mlflow), STORAGE_DIR (/storage), MLFLOW_TRACKING_URI (when set,
# no local server is started), BUILD (1: run make build at the end), DRY_RUN.
set -euo pipefail

CHECKOUT="${CHECKOUT:-$HOME/py_tf2_gpu_dock_mlflow}"
STORAGE_DIR="${STORAGE_DIR:-/storage}"
BUILD="${BUILD:-1}"
DRY_RUN="${DRY_RUN:-}"

step() { printf '\n== %s\n' "$*"; }
run() {
    echo "+ $*"
    [[ -n "$DRY_RUN" ]] || "$@"
}
have() { command -v "$1" >/dev/null 2>&1; }
SUDO=""
[[ "$(id -u)" == 0 ]] || SUDO="sudo"

step "1/7 NVIDIA driver"
if have nvidia-smi && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L
else
    echo "nvidia-smi finds no GPU. Use a GPU instance type (g4dn, g5, g6) with the Deep"
    echo "Learning Base GPU AMI, or install the driver: sudo ubuntu-drivers install && sudo reboot."
    echo "Going on without a GPU: training will run on the CPU."
fi

step "2/7 Docker"
if ! have docker; then
    run $SUDO apt-get update
    run $SUDO apt-get install -y docker.io
fi
if ! id -nG | grep -qw docker && [[ "$(id -u)" != 0 ]]; then
    run $SUDO usermod -aG docker "$USER"
    echo "added $USER to the docker group: log out and in again for it to take effect"
    DOCKER_SUDO="$SUDO"  # until then, docker needs sudo in this shell
else
    DOCKER_SUDO=""
fi
DOCKER="$DOCKER_SUDO docker"

step "3/7 NVIDIA Container Toolkit"
if $DOCKER info --format '{{json .Runtimes}}' 2>/dev/null | grep -q nvidia; then
    echo "Docker has the nvidia runtime"
elif have nvidia-smi; then
    keyring=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
    list=/etc/apt/sources.list.d/nvidia-container-toolkit.list
    base=https://nvidia.github.io/libnvidia-container
    run bash -c "curl -fsSL $base/gpgkey | $SUDO gpg --dearmor --yes -o $keyring"
    run bash -c "curl -fsSL $base/stable/deb/nvidia-container-toolkit.list \
        | sed 's#deb https://#deb [signed-by=$keyring] https://#g' | $SUDO tee $list >/dev/null"
    run $SUDO apt-get update
    run $SUDO apt-get install -y nvidia-container-toolkit
    run $SUDO nvidia-ctk runtime configure --runtime=docker
    run $SUDO systemctl restart docker
else
    echo "no GPU: skipping the toolkit"
fi

step "4/7 Python 3.11, git and make"
if ! have python3.11; then
    if ! apt-cache show python3.11-venv >/dev/null 2>&1; then
        # Ubuntu 24.04 ships 3.12 only; the deadsnakes PPA has 3.11.
        run $SUDO add-apt-repository -y ppa:deadsnakes/ppa
        run $SUDO apt-get update
    fi
    run $SUDO apt-get install -y python3.11 python3.11-venv
fi
have git && have make || run $SUDO apt-get install -y git make

step "5/7 Data folder $STORAGE_DIR"
if [[ ! -d "$STORAGE_DIR" ]]; then
    run $SUDO mkdir -p "$STORAGE_DIR"
    run $SUDO chown "$(id -u):$(id -g)" "$STORAGE_DIR"
fi

step "6/7 The project in $CHECKOUT"
if [[ ! -d "$CHECKOUT/.git" ]]; then
    : "${REPO_URL:?set REPO_URL to your fork of this repository}"
    run git clone "$REPO_URL" "$CHECKOUT"
fi
run make -C "$CHECKOUT" env PYTHON=python3.11

step "7/7 Tracking server"
if [[ -n "${MLFLOW_TRACKING_URI:-}" ]]; then
    echo "using MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI"
else
    run make -C "$CHECKOUT" server
    MLFLOW_TRACKING_URI=http://127.0.0.1:5000
    if ! grep -q "MLFLOW_TRACKING_URI" "$HOME/.bashrc" 2>/dev/null; then
        run bash -c "echo 'export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI' >> '$HOME/.bashrc'"
    fi
fi

if [[ "$BUILD" == 1 ]]; then
    step "Building the training image (several minutes the first time)"
    run $DOCKER_SUDO make -C "$CHECKOUT" build
fi

cat <<EOF

Set up. Next:
  cd $CHECKOUT && source .venv/bin/activate
  export MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI
  make load_tfdata           # the malaria dataset into $STORAGE_DIR/tfdata
  make run                   # train in Docker; watch it in the MLflow UI
The UI: ssh -L 5000:127.0.0.1:5000 ubuntu@<instance address>, then http://localhost:5000
EOF
