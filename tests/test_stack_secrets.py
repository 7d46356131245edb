"""The team server's secrets: nothing starts while one is missing, public or weak.

`make stack-secrets` writes tracking_server/.env; `make stack-up` (on the host, before
Docker) and start_server.py (in the container) refuse to start with the values printed
in .env.example. No Docker: the Makefile runs in a copy of the project whose PATH has a
`docker` that only writes down that it was called, and start_server.py runs with the
environment compose.yaml would give it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.servers import free_port, spawn, stop_process_group, tail

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "tracking_server"
EXAMPLE = FOLDER / ".env.example"
SECRET_NAMES = (
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)
# How start_server.py names each secret: compose hands it over under another name.
SERVER_LABELS = {
    "POSTGRES_PASSWORD": "the password in MLFLOW_BACKEND_STORE_URI (POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD": "AWS_SECRET_ACCESS_KEY (MINIO_ROOT_PASSWORD",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "MLFLOW_AUTH_ADMIN_PASSWORD is",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "MLFLOW_FLASK_SERVER_SECRET_KEY is",
}


def read_settings(path: Path) -> dict[str, str]:
    """NAME=value lines of an env file."""
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def write_settings(path: Path, settings: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    return path


def generate(path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(FOLDER / "stack_secrets.py"), "generate", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def check(path: Path) -> subprocess.CompletedProcess:
    """The check `make stack-up` runs, on the env file at `path`."""
    command = [sys.executable, str(FOLDER / "stack_secrets.py"), "check", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.fixture
def generated(tmp_path) -> dict[str, str]:
    """The settings of a freshly generated .env."""
    done = generate(tmp_path / "generated.env")
    assert done.returncode == 0, done.stderr
    return read_settings(tmp_path / "generated.env")


def assert_refused(done: subprocess.CompletedProcess, names: list[str]) -> str:
    """A one-paragraph refusal that names `names` and says how to make good values."""
    # make adds its own "make: *** [...] Error 1" line after the refusal.
    lines = [line for line in done.stderr.splitlines() if not line.startswith("make: ***")]
    message = "\n".join(lines).strip()
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "\n" not in message, f"not one paragraph:\n{message}"
    for name in names:
        assert name in message, f"{name} not named in: {message}"
    assert "make stack-secrets" in message
    assert "secrets.token_hex(32)" in message
    return message


# ---------------------------------------------------------------- make, in a copy


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the Makefile and tracking_server/ without any .env."""
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("Makefile", "MLproject"):
        shutil.copy(ROOT / name, copy / name)
    ignored = shutil.ignore_patterns(".env", "__pycache__")
    shutil.copytree(FOLDER, copy / "tracking_server", ignore=ignored)
    return copy


def make(project: Path, target: str) -> subprocess.CompletedProcess:
    """`make target` in `project` under umask 000, with a `docker` that records its calls."""
    shim = project.parent / "bin"
    shim.mkdir(exist_ok=True)
    docker = shim / "docker"
    docker.write_text('#!/bin/sh\necho "$@" >> "$DOCKER_CALLS"\n')
    docker.chmod(0o755)
    # a make of its own, not a sub-make of `make test` (MAKELEVEL would make it print
    # "make[1]: ***" and pass on the outer make's flags)
    outer = ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")
    env = {
        **{k: v for k, v in os.environ.items() if k not in outer},
        "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
        "DOCKER_CALLS": str(project.parent / "docker-calls.txt"),
    }
    # umask 000: the .env must be private by itself, not thanks to the user's umask.
    command = f"umask 000 && exec make --no-print-directory {target} PYTHON={sys.executable}"
    return subprocess.run(
        ["bash", "-c", command], cwd=project, env=env, capture_output=True, text=True, timeout=60
    )


def docker_calls(project: Path) -> list[str]:
    calls = project.parent / "docker-calls.txt"
    return calls.read_text().splitlines() if calls.exists() else []


def test_make_stack_secrets_writes_a_private_env_that_passes_the_check(project):
    done = make(project, "stack-secrets")
    assert done.returncode == 0, done.stdout + done.stderr

    env_file = project / "tracking_server" / ".env"
    mode = stat.S_IMODE(env_file.stat().st_mode)
    assert mode == 0o600, f"mode {mode:o}: others may read the secrets"
    settings, example = read_settings(env_file), read_settings(EXAMPLE)
    for name in SECRET_NAMES:
        assert settings[name] and settings[name] != example[name]
        assert "change-me" not in settings[name]
    # Everything else (comments, ports, user names) is the example's, line for line.
    kept = [
        line for line in env_file.read_text().splitlines() if line.split("=")[0] not in SECRET_NAMES
    ]
    assert kept == [
        line for line in EXAMPLE.read_text().splitlines() if line.split("=")[0] not in SECRET_NAMES
    ]
    assert check(env_file).returncode == 0


def test_generated_secrets_are_fresh_each_time(tmp_path):
    first, second = tmp_path / "first.env", tmp_path / "second.env"
    assert generate(first).returncode == generate(second).returncode == 0
    for name in SECRET_NAMES:
        assert read_settings(first)[name] != read_settings(second)[name], name


def test_make_stack_secrets_keeps_an_existing_env(project):
    env_file = project / "tracking_server" / ".env"
    env_file.write_text("POSTGRES_PASSWORD=the-one-my-database-already-has\n")
    before = env_file.read_bytes()

    done = make(project, "stack-secrets")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "exists; left unchanged" in done.stdout
    assert env_file.read_bytes() == before


def test_make_stack_up_refuses_the_example_env_before_docker(project):
    shutil.copy(EXAMPLE, project / "tracking_server" / ".env")

    done = make(project, "stack-up")

    assert_refused(done, list(SECRET_NAMES))
    assert docker_calls(project) == [], "docker ran although the secrets were refused"


def test_make_stack_up_without_env_says_how_to_make_one(project):
    done = make(project, "stack-up")
    assert done.returncode != 0
    assert "make stack-secrets" in done.stderr
    assert docker_calls(project) == []


def test_make_stack_up_with_generated_secrets_reaches_docker(project):
    """The other side of the refusal tests: good secrets do get to `docker compose`."""
    assert make(project, "stack-secrets").returncode == 0

    done = make(project, "stack-up")

    assert done.returncode == 0, done.stdout + done.stderr
    assert docker_calls(project) == ["compose -f tracking_server/compose.yaml up -d --build --wait"]


# ---------------------------------------------------------------- the check's rules


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_check_refuses_each_example_value(tmp_path, generated, name):
    settings = {**generated, name: read_settings(EXAMPLE)[name]}

    message = assert_refused(check(write_settings(tmp_path / ".env", settings)), [name])

    assert f"{name} is a value printed in .env.example" in message
    assert [other for other in SECRET_NAMES if other in message] == [name]


def test_check_names_every_weak_or_missing_secret_at_once(tmp_path, generated):
    settings = {
        **generated,
        "POSTGRES_PASSWORD": "",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "eleven-char",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }

    message = assert_refused(check(write_settings(tmp_path / ".env", settings)), [])

    assert "POSTGRES_PASSWORD is missing" in message
    assert "MLFLOW_AUTH_ADMIN_PASSWORD is shorter than 12 characters" in message
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY is shorter than 32 random bytes" in message
    assert "MINIO_ROOT_PASSWORD" not in message


def test_check_refuses_a_password_copied_from_another_example_setting(tmp_path, generated):
    # MINIO_ROOT_USER's example value has 12 characters and no change-me, but it is public.
    settings = {
        **generated,
        "MLFLOW_AUTH_ADMIN_PASSWORD": read_settings(EXAMPLE)["MINIO_ROOT_USER"],
    }
    message = assert_refused(check(write_settings(tmp_path / ".env", settings)), [])
    assert "MLFLOW_AUTH_ADMIN_PASSWORD is a value printed in .env.example" in message


@pytest.mark.parametrize(
    "key", [secrets.token_hex(32), secrets.token_urlsafe(32)], ids=["hex", "base64"]
)
def test_check_accepts_a_key_of_32_random_bytes_in_hex_or_base64(tmp_path, generated, key):
    settings = {**generated, "MLFLOW_FLASK_SERVER_SECRET_KEY": key}
    done = check(write_settings(tmp_path / ".env", settings))
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------- start_server.py


@pytest.fixture
def image_app(tmp_path) -> Path:
    """/app as the image has it: start_server.py and stack_secrets.py, no .env.example."""
    app = tmp_path / "app"
    app.mkdir()
    for name in ("start_server.py", "stack_secrets.py"):
        shutil.copy(FOLDER / name, app / name)
    return app


def compose_environment(settings: dict[str, str]) -> dict[str, str]:
    """The mlflow service's environment as compose.yaml builds it from a .env's settings."""
    compose = yaml.safe_load((FOLDER / "compose.yaml").read_text())
    pattern = re.compile(r"\$\{([A-Z_]+)(?::([-?])([^}]*))?\}")

    def substitute(match: re.Match) -> str:
        name, operator, default = match.groups()
        return settings.get(name) or (default if operator == "-" else "")

    environment = compose["services"]["mlflow"]["environment"]
    return {name: pattern.sub(substitute, str(value)) for name, value in environment.items()}


def start_server_env(settings: dict[str, str]) -> dict[str, str]:
    """compose_environment, with the database on a local port where nothing listens."""
    env = {**os.environ, **compose_environment(settings)}
    local = f"@127.0.0.1:{free_port()}/"
    env["MLFLOW_BACKEND_STORE_URI"] = env["MLFLOW_BACKEND_STORE_URI"].replace(
        "@postgres:5432/", local
    )
    return env


def test_start_server_refuses_the_example_env_before_connecting(image_app):
    done = subprocess.run(
        [sys.executable, str(image_app / "start_server.py")],
        env=start_server_env(read_settings(EXAMPLE)),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert_refused(done, list(SERVER_LABELS.values()))
    assert "waiting for PostgreSQL" not in done.stdout + done.stderr


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_start_server_refuses_each_example_value(image_app, generated, name):
    settings = {**generated, name: read_settings(EXAMPLE)[name]}
    done = subprocess.run(
        [sys.executable, str(image_app / "start_server.py")],
        env=start_server_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )

    message = assert_refused(done, [SERVER_LABELS[name]])
    assert [other for other in SECRET_NAMES if other in message] == [name]


def test_start_server_with_generated_secrets_goes_on_to_the_database(
    image_app, generated, tmp_path
):
    log_path = tmp_path / "start_server.log"
    process = spawn(
        [sys.executable, str(image_app / "start_server.py")], log_path, start_server_env(generated)
    )
    try:
        deadline = time.monotonic() + 60
        while "waiting for PostgreSQL" not in log_path.read_text():
            assert process.poll() is None, f"start_server exited:\n{tail(log_path)}"
            assert time.monotonic() < deadline, f"no attempt to reach PostgreSQL:\n{tail(log_path)}"
            time.sleep(0.2)
        assert "refusing" not in log_path.read_text()
    finally:
        stop_process_group(process)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "password1234", "a common word or a known default"),
        ("MINIO_ROOT_PASSWORD", "minioadminminioadmin", "a common word or a known default"),
        ("POSTGRES_PASSWORD", "Postgres!2024", "a common word or a known default"),
        ("MLFLOW_AUTH_ADMIN_PASSWORD", "a" * 12, "predictable"),
        ("MINIO_ROOT_PASSWORD", "123456789012", "predictable"),
        ("POSTGRES_PASSWORD", "q9Zq9Zq9Zq9Zq9Z", "predictable"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "0" * 64, "predictable"),
        ("MLFLOW_FLASK_SERVER_SECRET_KEY", "ab" * 32, "predictable"),
    ],
)
def test_check_refuses_low_entropy_values_not_only_short_ones(
    tmp_path, generated, name, value, says
):
    settings = {**generated, name: value}
    message = assert_refused(check(write_settings(tmp_path / ".env", settings)), [])
    assert f"{name} is {says}" in message
    assert [other for other in SECRET_NAMES if other in message] == [name]


def test_fresh_values_and_a_long_passphrase_pass_the_entropy_check(
    tmp_path, generated, monkeypatch
):
    spec = importlib.util.spec_from_file_location("stack_secrets", FOLDER / "stack_secrets.py")
    stack_secrets = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "stack_secrets", stack_secrets)
    spec.loader.exec_module(stack_secrets)
    for _ in range(50):  # every value make stack-secrets writes passes, every time
        for secret in stack_secrets.SECRETS:
            assert secret.weakness(secret.new_value()) is None
    settings = {**generated, "MLFLOW_AUTH_ADMIN_PASSWORD": "correct horse battery staple"}
    assert check(write_settings(tmp_path / ".env", settings)).returncode == 0
