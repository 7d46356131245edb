#!/usr/bin/env bash
# Make a small Debian bookworm image with Python 3.11, pip, git and CA
# certificates, without any registry: debootstrap a root file system and
# `docker import` it. The Docker end-to-end test builds the training image on it
# (BASE_IMAGE=...) where the default TensorFlow GPU base cannot be pulled.
#
# Usage: tests/docker_base.sh [TAG]     (default: py-tf2-base:bookworm-py311)
# The image is made once and reused by tag: delete it to make it again.
# Needs root, debootstrap and a running Docker engine.
set -euo pipefail

TAG="${1:-py-tf2-base:bookworm-py311}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists: reusing it"
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "debootstrap is missing: apt-get install debootstrap" >&2
    exit 1
}

ROOTFS="$(mktemp -d /tmp/docker-base.XXXXXX)"
trap 'rm -rf "$ROOTFS"' EXIT

echo "debootstrap bookworm into $ROOTFS (about a minute)"
start=$SECONDS
debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates,git \
    bookworm "$ROOTFS" "$MIRROR" >"$ROOTFS.log" 2>&1 || {
    tail -20 "$ROOTFS.log" >&2
    exit 1
}
rm -f "$ROOTFS.log"

# Trust the same extra CA certificates as this host (a TLS-inspecting proxy
# needs them for pip and apt inside `docker build`); none is normal elsewhere.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
    chroot "$ROOTFS" update-ca-certificates >/dev/null
fi
# The official TensorFlow images let pip install into the system Python; do the same.
rm -f "$ROOTFS"/usr/lib/python3*/EXTERNALLY-MANAGED
# Shrink: package lists and caches are not needed in the image.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb

tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$TAG" >/dev/null
echo "made base image $TAG in $((SECONDS - start)) s"
