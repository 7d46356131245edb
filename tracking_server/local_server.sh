#!/usr/bin/env bash
# A local MLflow tracking server for one machine: `make server` / `make server-stop`.
#
#   tracking_server/local_server.sh start    # start in the background, print the URL
#   tracking_server/local_server.sh stop     # stop exactly the server that `start` started
#   tracking_server/local_server.sh status   # say whether it runs
#
# Backend: the same SQLite store train.py uses without a server (mlflow.db in the
# project folder), so runs logged before the server existed show up in it too.
# Artifacts: proxied (--serve-artifacts) into mlartifacts/ in the project folder;
# clients upload and download them over HTTP, so a container or another machine
# needs no shared path. The server listens on loopback only.
#
# Settings (environment): MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000),
# MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_SERVER_STATE_DIR
# (where the PID file and log go, default outputs/), MLFLOW_BIN (mlflow).
set -euo pipefail

PROJECT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///${PROJECT_DIR}/mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-${PROJECT_DIR}/mlartifacts}"
STATE_DIR="${MLFLOW_SERVER_STATE_DIR:-${PROJECT_DIR}/outputs}"
MLFLOW_BIN="${MLFLOW_BIN:-${PROJECT_DIR}/.venv/bin/mlflow}"
PID_FILE="${STATE_DIR}/mlflow-server.pid"
LOG_FILE="${STATE_DIR}/mlflow-server.log"
URL="http://${HOST}:${PORT}"

# The PID file names a process group leader (setsid); before signalling it we check
# that this PID is still an `mlflow server`, so a recycled PID is never killed.
running_pid() {
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ -r "/proc/${pid}/cmdline" ]] || return 1
    tr '\0' ' ' <"/proc/${pid}/cmdline" | grep -q "mlflow.* server" || return 1
    echo "$pid"
}

healthy() {
    python3 - "$URL/health" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
        sys.exit(0 if response.status == 200 else 1)
except OSError:
    sys.exit(1)
EOF
}

port_taken() {
    python3 - "$HOST" "$PORT" <<'EOF'
import socket, sys
with socket.socket() as sock:
    sock.settimeout(1)
    sys.exit(0 if sock.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 1)
EOF
}

start() {
    if pid="$(running_pid)"; then
        echo "MLflow server already running (PID $pid): $URL"
        return 0
    fi
    if [[ ! -x "$MLFLOW_BIN" ]]; then
        echo "error: $MLFLOW_BIN not found; run 'make env' first (or set MLFLOW_BIN)." >&2
        return 1
    fi
    if port_taken; then
        echo "error: something else already listens on ${HOST}:${PORT}." >&2
        echo "       Stop it, or pick another port: make server MLFLOW_PORT=5001" >&2
        return 1
    fi
    mkdir -p "$STATE_DIR" "$ARTIFACTS"
    # setsid: the server and its workers form one process group that `stop` ends whole.
    setsid "$MLFLOW_BIN" server \
        --host "$HOST" --port "$PORT" --workers 1 \
        --backend-store-uri "$BACKEND" \
        --serve-artifacts --artifacts-destination "$ARTIFACTS" \
        >>"$LOG_FILE" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
    echo "starting MLflow server (PID $(cat "$PID_FILE")), log: $LOG_FILE"
    for _ in $(seq 1 120); do
        if healthy; then
            echo "MLflow server running: $URL"
            echo "  backend:   $BACKEND"
            echo "  artifacts: $ARTIFACTS (proxied over HTTP)"
            echo "Use it:  export MLFLOW_TRACKING_URI=$URL"
            echo "Stop it: make server-stop"
            return 0
        fi
        if ! running_pid >/dev/null; then
            echo "error: the MLflow server exited during start-up; last lines of $LOG_FILE:" >&2
            tail -n 20 "$LOG_FILE" >&2
            rm -f "$PID_FILE"
            return 1
        fi
        sleep 1
    done
    echo "error: no answer from $URL/health after 120 s; see $LOG_FILE" >&2
    return 1
}

stop() {
    local pid
    if ! pid="$(running_pid)"; then
        rm -f "$PID_FILE"
        echo "no MLflow server started by 'make server' is running"
        return 0
    fi
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do
        if ! kill -0 -- "-$pid" 2>/dev/null; then
            rm -f "$PID_FILE"
            echo "MLflow server (PID $pid) stopped"
            return 0
        fi
        sleep 0.5
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$PID_FILE"
    echo "MLflow server (PID $pid) did not stop in 15 s and was killed"
}

status() {
    if pid="$(running_pid)"; then
        echo "MLflow server running (PID $pid): $URL"
    else
        echo "no MLflow server started by 'make server' is running"
        return 1
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
