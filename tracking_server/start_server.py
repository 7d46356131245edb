"""Start the team tracking server: PostgreSQL backend, S3 artifacts, basic auth.

The entry point of the `mlflow` service in compose.yaml; the slow tests run this same
file against a real PostgreSQL and a real S3 store without Docker. It waits for the
database and the object store, creates the auth database and the artifact bucket when
they are missing, writes the basic-auth config, and then replaces itself with
`mlflow server --app-name basic-auth` serving artifacts through itself
(--serve-artifacts), so clients need only the tracking URL and a user name.

Environment (see .env.example):
    MLFLOW_BACKEND_STORE_URI        postgresql://USER:PASSWORD@HOST:5432/mlflow (required)
    MLFLOW_AUTH_DATABASE_URI        users and permissions (default: database mlflow_auth
                                    on the same server)
    MLFLOW_ARTIFACTS_BUCKET         bucket for artifacts (default mlflow)
    MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY   the S3 store
    MLFLOW_AUTH_ADMIN_USERNAME, MLFLOW_AUTH_ADMIN_PASSWORD   first admin (read by MLflow)
    MLFLOW_FLASK_SERVER_SECRET_KEY  signs the auth app's forms (required)
    MLFLOW_AUTH_DEFAULT_PERMISSION  what a new user may do with others' work (READ)
    MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (2)
    MLFLOW_ALLOWED_HOSTS            Host headers to accept (MLflow's default: localhost
                                    and private addresses)

Before anything else it refuses to start, naming every setting to change, while a
secret (the database password in the URI, the S3 secret key, the admin password, the
form-signing key) is missing, a value from .env.example or weak: stack_secrets.py, the
same check `make stack-up` runs on tracking_server/.env before Docker starts.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import stack_secrets  # next to this file, here and in the image

# Required settings that are not secrets; stack_secrets checks the secrets.
REQUIRED = ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")


def wait_for(what: str, attempt, timeout: float = 120) -> None:
    """Call attempt() until it stops raising, for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            attempt()
            return
        except Exception as err:
            if time.monotonic() > deadline:
                message = f"start_server: {what} not reachable after {timeout:.0f} s: {err}"
                raise SystemExit(message) from err
            print(f"start_server: waiting for {what} ({type(err).__name__})", flush=True)
            time.sleep(2)


def ensure_database(admin_uri: str, database: str) -> None:
    """Create `database` on the server of `admin_uri` unless it exists."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(admin_uri, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        exists = conn.execute(
            sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": database}
        ).scalar()
        if not exists:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{database}"'))
            print(f"start_server: created database {database}", flush=True)
    engine.dispose()


def ensure_bucket(bucket: str) -> None:
    """Create the artifact bucket unless it exists (credentials from the environment)."""
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"])
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise
        s3.create_bucket(Bucket=bucket)
        print(f"start_server: created bucket {bucket}", flush=True)


def auth_config(database_uri: str, default_permission: str) -> Path:
    """Write the basic-auth app's config file; the admin comes from the environment."""
    path = Path(tempfile.mkdtemp(prefix="mlflow-auth-")) / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {database_uri}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def main() -> None:
    problems = {name: "missing" for name in REQUIRED if not os.environ.get(name)}
    problems |= stack_secrets.server_problems(os.environ)
    if problems:
        raise SystemExit(f"start_server: {stack_secrets.refusal(problems, 'the environment')}")

    from sqlalchemy.engine import make_url

    backend = os.environ["MLFLOW_BACKEND_STORE_URI"]
    backend_url = make_url(backend)
    auth_uri = os.environ.get("MLFLOW_AUTH_DATABASE_URI") or backend_url.set(
        database="mlflow_auth"
    ).render_as_string(hide_password=False)
    bucket = os.environ.get("MLFLOW_ARTIFACTS_BUCKET", "mlflow")

    wait_for("PostgreSQL", lambda: ensure_database(backend, make_url(auth_uri).database))
    wait_for("the S3 store", lambda: ensure_bucket(bucket))
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(
        auth_config(auth_uri, os.environ.get("MLFLOW_AUTH_DEFAULT_PERMISSION", "READ"))
    )
    os.environ.setdefault("MLFLOW_AUTH_ADMIN_USERNAME", "admin")

    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--app-name",
        "basic-auth",
        "--backend-store-uri",
        backend,
        "--serve-artifacts",
        "--artifacts-destination",
        f"s3://{bucket}/",
        "--host",
        os.environ.get("MLFLOW_HOST", "0.0.0.0"),
        "--port",
        os.environ.get("MLFLOW_PORT", "5000"),
        "--workers",
        os.environ.get("MLFLOW_WORKERS", "2"),
    ]
    if os.environ.get("MLFLOW_ALLOWED_HOSTS"):
        command += ["--allowed-hosts", os.environ["MLFLOW_ALLOWED_HOSTS"]]
    print(f"start_server: {' '.join(command)}", flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
