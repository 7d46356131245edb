"""The host side stays light: importing project_driver and every module of host/ in a
fresh interpreter loads neither TensorFlow nor Keras (nor MLflow, which the functions
that need it import), and `project_driver.py --help` answers at once."""

from __future__ import annotations

import subprocess
import sys
import time

from engine.common import PROJECT_DIR

HOST_MODULES = sorted(f"host.{path.stem}" for path in (PROJECT_DIR / "host").glob("[a-z]*.py"))


def test_the_host_imports_no_tensorflow_keras_or_mlflow():
    assert {"host.launch", "host.plan", "host.sweep", "host.tune"} <= set(HOST_MODULES)
    code = (
        f"import sys, importlib; [importlib.import_module(m) for m in {HOST_MODULES!r}]; "
        "import project_driver; project_driver.build_parser(); "
        "print(' '.join(m for m in ('tensorflow', 'keras', 'mlflow') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == ""


def test_project_driver_help_answers_in_under_two_seconds():
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "project_driver.py", "--help"],
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        check=True,
    )
    assert time.monotonic() - started < 2
    assert "sweep" in done.stdout and "run" in done.stdout
