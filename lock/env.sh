#!/usr/bin/env bash
# The two commands behind `make env` and `make lock` (the Makefile passes VENV and PYTHON).
#
#   lock/env.sh install VENV PYTHON [uv|pip]   .venv from lock/dev.txt, every file hash-checked
#   lock/env.sh lock VENV PYTHON [--upgrade]   rewrite lock/*.txt from the requirements files
#
# install: uv (pinned in lock/uv.txt, installed by pip with its hashes) syncs the venv to
# the lock in seconds; `pip` installs the same lock with pip --require-hashes and removes
# what the lock does not name, so either way the venv holds exactly the lock. The stamp
# VENV/.installed is written last: a failed install removes the stamp, and the venv too
# when this run created it, so make never takes a half-made venv for done.
set -euo pipefail
cd "$(dirname "$0")/.."

# uv reads the platform's certificates, like pip with PIP_CERT (TLS-inspecting proxies).
export UV_SYSTEM_CERTS="${UV_SYSTEM_CERTS:-1}"
# The machines the locks are for (CI, the image, a developer's): see `make lock` in README.
LOCK_FOR=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)
LOG="$(mktemp "${TMPDIR:-/tmp}/make-env.XXXXXX")"
trap 'rm -f "$LOG"' EXIT

# Why an install failed, in one paragraph, after the installer's own last lines.
explain() {
    local file=$1 fix
    tail -n 15 "$LOG" >&2
    if grep -qiE 'hash' "$LOG"; then
        fix="a file the registry served does not have the hash $file records. If you edited $file by hand, run \`make lock\`; otherwise the download was corrupted or tampered with: run \`make env\` again, and if it persists, \`make lock\` and review the diff."
    elif grep -qiE 'connect|network|dns|timed out|offline|unreachable|proxy|failed to fetch|error sending request|from versions: none' "$LOG"; then
        fix="the package registry could not be reached, or does not serve the locked version. Check the network (and PIP_INDEX_URL / UV_INDEX_URL, the proxy), then run \`make env\` again."
    else
        fix="see the installer's lines above; \`make env\` starts again from the lock."
    fi
    echo "make env: could not install $file: $fix" >&2
}

# The EXIT trap of a failed install: no stamp, and no venv when this run created it.
unfinished() {
    local status=$? venv=$1 created=$2
    rm -f "$LOG"
    [ "$status" = 0 ] && return
    rm -f "$venv/.installed"
    if [ "$created" = true ]; then
        rm -rf "$venv"
        echo "make env: removed the unfinished $venv" >&2
    fi
}

# The version lock/uv.in pins.
uv_version() { sed -n 's/^uv==\([^ ]*\).*/\1/p' lock/uv.in; }

install() {
    local venv=$1 python=$2 installer=${3:-uv} created=false
    "$python" -m engine.environment check || {
        echo "make env: nothing installed; the locks are older than the requirements files." >&2
        exit 1
    }
    rm -f "$venv/.installed"
    if [ ! -x "$venv/bin/python" ]; then
        rm -rf "$venv"
        "$python" -m venv "$venv"
        created=true
    fi
    # From here on, a failure leaves no stamp, and no venv that this run made.
    trap "unfinished '$venv' $created" EXIT
    local pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
    if [ "$installer" = uv ]; then
        if ! "$venv/bin/uv" --version 2>/dev/null | grep -qF "uv $(uv_version)"; then
            "${pip[@]}" install --require-hashes --no-deps -r lock/uv.txt >"$LOG" 2>&1 ||
                { explain lock/uv.txt; exit 1; }
        fi
        "$venv/bin/uv" pip sync --quiet --require-hashes --python "$venv/bin/python" \
            lock/dev.txt >"$LOG" 2>&1 || { explain lock/dev.txt; exit 1; }
    else
        "${pip[@]}" install --require-hashes --no-deps -r lock/dev.txt >"$LOG" 2>&1 ||
            { explain lock/dev.txt; exit 1; }
        # What the lock does not name goes, as `uv pip sync` does (pip and uv stay).
        local extras
        extras=$("$venv/bin/python" -m engine.environment extras lock/dev.txt)
        [ -z "$extras" ] || "${pip[@]}" uninstall --yes $extras
    fi
    touch "$venv/.installed"
    trap 'rm -f "$LOG"' EXIT
    echo "$venv holds lock/dev.txt ($(grep -cE '^[A-Za-z0-9].*==' lock/dev.txt) packages, via $installer)"
}

# The uv that makes the locks: the venv's when it is the pinned one, else a throwaway copy.
lock_uv() {
    local venv=$1 python=$2 tool
    if "$venv/bin/uv" --version 2>/dev/null | grep -qF "uv $(uv_version)"; then
        echo "$venv/bin/uv"
        return
    fi
    tool="$(mktemp -d "${TMPDIR:-/tmp}/make-lock-uv.XXXXXX")"
    # A new project has no lock/uv.txt yet: then uv.in's exact pin, without hashes.
    local from=(--require-hashes -r lock/uv.txt)
    [ -f lock/uv.txt ] || from=(-r lock/uv.in)
    "$python" -m pip --quiet --disable-pip-version-check install --no-deps \
        --target "$tool" "${from[@]}" >&2
    echo "$tool/bin/uv"
}

lock() {
    local venv=$1 python=$2 upgrade=${3:-} uv work
    uv=$(lock_uv "$venv" "$python")
    work="$(mktemp -d "${TMPDIR:-/tmp}/make-lock.XXXXXX")"
    # The old locks are uv's preferences: packages nobody asked to change keep their pins.
    cp lock/*.txt "$work/" 2>/dev/null || true
    local compile=("$uv" pip compile --quiet --generate-hashes "${LOCK_FOR[@]}"
        --custom-compile-command "make lock" $upgrade)
    # dev first: it decides every version; runtime and server are its subsets, constrained
    # to it, so .venv, the training image and the server image agree package by package.
    "${compile[@]}" tests/requirements.txt -o "$work/dev.txt"
    "${compile[@]}" requirements.txt -c "$work/dev.txt" -o "$work/runtime.txt"
    grep -E '^mlflow==' requirements.txt |
        "${compile[@]}" - tracking_server/requirements.txt -c "$work/dev.txt" -o "$work/server.txt"
    "${compile[@]}" lock/uv.in -o "$work/uv.txt"
    sed -i "s|$work/|lock/|g" "$work"/*.txt
    mv "$work"/{dev,runtime,server,uv}.txt lock/
    rm -rf "$work"
    case "$uv" in "$venv"/*) ;; *) rm -rf "$(dirname "$(dirname "$uv")")" ;; esac
    "$python" -m engine.environment stamp
    echo "lock/: $(grep -cE '^[A-Za-z0-9].*==' lock/runtime.txt) runtime, $(grep -cE '^[A-Za-z0-9].*==' lock/dev.txt) development packages; commit them with the requirements files"
}

command=$1
shift
"$command" "$@"
