"""Stand-ins for the host tests: fake `docker`, `nvidia-smi` and `mlflow` commands first
on PATH, and a loopback HTTP server that answers as an MLflow server does. Plain helpers
(no fixtures), so that each tests/test_host_*.py wraps what it needs in its own."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

# What the fake server says about an experiment: its artifacts go through the server.
SERVER_EXPERIMENT = {
    "experiment": {
        "experiment_id": "0",
        "name": "Default",
        "artifact_location": "mlflow-artifacts:/0",
        "lifecycle_stage": "active",
    }
}


class _MlflowLikeHandler(http.server.BaseHTTPRequestHandler):
    """200 OK to every GET; MLflow's experiment API answers SERVER_EXPERIMENT, or
    RESOURCE_DOES_NOT_EXIST for the experiment named "missing"."""

    def do_GET(self):  # noqa: N802 (the stdlib's name)
        if "experiment_name=missing" in self.path:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}')
            return
        self.send_response(200)
        self.end_headers()
        if "/mlflow/experiments/" in self.path:
            self.wfile.write(json.dumps(SERVER_EXPERIMENT).encode())
        else:
            self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_server() -> Iterator[str]:
    """A loopback HTTP server that answers like an MLflow server; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MlflowLikeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def fake_command(bin_dir: Path, name: str, script: str) -> None:
    """A shell script `name` in bin_dir."""
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(script))
    path.chmod(0o755)


def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder first on PATH for fake commands; `python` in it runs this interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_command(bin_dir, "python", f'exec "{sys.executable}" "$@"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def fake_docker(bin_dir: Path, runtimes: dict) -> None:
    """`docker info --format '{{json .Runtimes}}'` prints these runtimes (and every other
    docker command, `docker build` included, succeeds)."""
    fake_command(bin_dir, "docker", f"echo '{json.dumps(runtimes)}'\n")
