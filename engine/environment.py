"""Which packages a run ran with: the lock it was installed from, and whether it still holds.

`make lock` turns the files people edit (requirements.txt, tests/requirements.txt,
tracking_server/requirements.txt, lock/uv.in) into locks under lock/ that pin every
package, dependencies included, with the hashes of the files the registry serves:

    lock/runtime.txt  what train.py and the image need (requirements.txt)
    lock/dev.txt      runtime + tests, lint and the tracking-server packages (.venv)
    lock/server.txt   the team tracking server's image (MLflow + tracking_server/)
    lock/uv.txt       uv itself, which `make env` installs first

Each lock's header names the inputs it was made from, each with a digest of its
requirement lines (`input_digests`; comments do not count), so a lock left behind by
an edit is caught before anything installs (`make env`) and by tests/test_lock.py,
both naming the changed file and `make lock`.

At run start `tags()` names the environment on the run: `env.lock_digest` (the runtime
lock's pins and hashes), `env.matches_lock` and, when it does not, which locked packages
are missing or at another version and which were installed beside the lock.

Command line (standard library only: `make env` runs it before any .venv exists):
    python -m engine.environment check          # every lock up to date with its inputs?
    python -m engine.environment stamp          # write the inputs' digests (make lock)
    python -m engine.environment extras LOCK    # installed here but not in LOCK
    python -m engine.environment show           # this environment's tags, as JSON
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
RUNTIME_LOCK = "lock/runtime.txt"
DEV_LOCK = "lock/dev.txt"
# Each lock and the files `make lock` makes it from (relative to the project folder).
INPUTS = ("requirements.txt", "tests/requirements.txt", "tracking_server/requirements.txt")
LOCKS = {
    RUNTIME_LOCK: INPUTS,
    DEV_LOCK: INPUTS,
    "lock/server.txt": INPUTS,
    "lock/uv.txt": ("lock/uv.in",),
}
# Header line of each lock: its inputs, each with the start of its sha256 (input_digests).
DIGEST_LINE = "# made from: "
DIGEST_CHARS = 16
# Installers, never pinned by a lock: their versions do not change what a run computes.
INSTALLERS = frozenset({"pip", "uv", "wheel"})
# The Dockerfile lists the base image's own packages here before it installs the lock:
# those were not installed by hand beside the lock, so they are not reported as extras.
BASE_PACKAGES_VARIABLE = "BASE_IMAGE_PACKAGES"
SHOWN = 5  # package names a tag lists before "+N more"

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")
_HASH = re.compile(r"--hash=(\w+:[0-9a-f]+)")


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares it: `PyYAML` and `pyyaml` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(text: str) -> list[str]:
    """The lines of a requirements file that matter, comments and blank lines left out."""
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def input_digests(inputs: Iterable[str], project_dir: Path = PROJECT_DIR) -> dict[str, str]:
    """Each input's sha256 over its requirement lines (a comment edit does not stale a lock).

    A missing input digests as an empty file.
    """
    digests = {}
    for name in inputs:
        path = project_dir / name
        lines = requirement_lines(path.read_text()) if path.is_file() else []
        digests[name] = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:DIGEST_CHARS]
    return digests


def recorded_digests(lock_text: str) -> dict[str, str]:
    """The input digests a lock's header records: name -> digest (empty when none)."""
    for line in lock_text.splitlines():
        if line.startswith(DIGEST_LINE):
            pairs = (entry.split("@") for entry in line[len(DIGEST_LINE) :].split())
            return {name: digest for name, digest in pairs}
    return {}


def changed_inputs(project_dir: Path = PROJECT_DIR) -> tuple[list[str], list[str]]:
    """The locks that are missing or out of date, and the inputs that changed since.

    Returns:
        (locks, inputs): both empty when every lock was made from today's inputs.
    """
    locks, inputs = [], []
    for lock, names in LOCKS.items():
        path = project_dir / lock
        recorded = recorded_digests(path.read_text()) if path.is_file() else {}
        changed = [
            name
            for name, digest in input_digests(names, project_dir).items()
            if recorded.get(name) != digest
        ]
        if changed:
            locks.append(lock)
            inputs.extend(name for name in changed if name not in inputs)
    return locks, inputs


def stale_message(project_dir: Path = PROJECT_DIR) -> str:
    """What `make lock` must redo, in one paragraph ('' when every lock is up to date)."""
    missing = [lock for lock in LOCKS if not (project_dir / lock).is_file()]
    locks, inputs = changed_inputs(project_dir)
    if not locks:
        return ""
    fix = (
        "run `make lock` (it rewrites lock/ from the requirements files), then commit the "
        "requirements files and lock/ together."
    )
    if missing:
        return f"{', '.join(missing)} missing: {fix}"
    return f"{', '.join(inputs)} changed since {', '.join(locks)} were made: {fix}"


def stamp(project_dir: Path = PROJECT_DIR) -> None:
    """Write each lock's input digests into its header, after uv's two header lines."""
    for lock, inputs in LOCKS.items():
        path = project_dir / lock
        lines = [line for line in path.read_text().splitlines() if not line.startswith(DIGEST_LINE)]
        header = sum(1 for line in lines[:2] if line.startswith("#"))
        pairs = " ".join(
            f"{name}@{digest}" for name, digest in input_digests(inputs, project_dir).items()
        )
        path.write_text("\n".join([*lines[:header], DIGEST_LINE + pairs, *lines[header:]]) + "\n")


def read_lock(text: str) -> dict[str, str]:
    """The pins of a lock (or any requirements file): normalized name -> version."""
    pins = {}
    for line in text.splitlines():
        match = _PIN.match(line.strip())
        if match:
            pins[normalize(match.group(1))] = match.group(3)
    return pins


def lock_digest(text: str) -> str:
    """sha256 over a lock's pins and their hashes, in order; comments and headers left out.

    Two locks that install the same files have the same digest, whatever their notes say.
    """
    entries, current = [], None
    for line in text.splitlines():
        match = _PIN.match(line.strip())
        if match:
            current = [f"{normalize(match.group(1))}=={match.group(3)}"]
            entries.append(current)
        if current is not None:
            current.extend(_HASH.findall(line))
    canonical = "\n".join(" ".join([entry[0], *sorted(entry[1:])]) for entry in entries)
    return hashlib.sha256(canonical.encode()).hexdigest()


def installed_versions() -> dict[str, str]:
    """Every distribution this interpreter sees: normalized name -> version (first on path)."""
    versions: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(normalize(name), dist.version)
    return versions


@dataclass(frozen=True)
class Comparison:
    """How an environment differs from a lock."""

    mismatched: list[str]  # "numpy==2.3.0 (lock 2.4.6)", "keras (missing; lock 3.15.1)"
    extras: list[str]  # "requests-mock==1.12.1": installed, not in the lock

    @property
    def matches(self) -> bool:
        return not self.mismatched and not self.extras


def compare(
    locked: Mapping[str, str], installed: Mapping[str, str], known: Iterable[str] = ()
) -> Comparison:
    """Compare installed versions with a lock's pins.

    Args:
        locked: the lock's pins (`read_lock`).
        installed: what is installed (`installed_versions`, or a mapping a test makes).
        known: names installed on purpose but not pinned by this lock (another lock's
            packages, a base image's own): not reported as extras.

    Returns:
        The packages at another version than the lock's, and those beside the lock.
    """
    mismatched = [
        f"{name}=={installed[name]} (lock {version})"
        if name in installed
        else f"{name} (missing; lock {version})"
        for name, version in sorted(locked.items())
        if installed.get(name) != version
    ]
    ignore = {normalize(name) for name in known} | INSTALLERS | set(locked)
    extras = [f"{name}=={version}" for name, version in sorted(installed.items())]
    extras = [entry for entry in extras if entry.split("==")[0] not in ignore]
    return Comparison(mismatched, extras)


def base_packages() -> list[str]:
    """The base image's own packages, when the Dockerfile listed them (else none)."""
    listing = os.environ.get(BASE_PACKAGES_VARIABLE, "")
    if not listing or not Path(listing).is_file():
        return []
    return list(read_lock(Path(listing).read_text()))


def shorten(entries: list[str]) -> str:
    """The first few entries and how many more, for a tag a person reads."""
    if not entries:
        return "none"
    more = f" (+{len(entries) - SHOWN} more)" if len(entries) > SHOWN else ""
    return ", ".join(entries[:SHOWN]) + more


def tags(
    project_dir: Path = PROJECT_DIR, installed: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The run's environment tags: the runtime lock's digest and whether this environment
    matches it. The development lock's packages (tests, lint) count as known, not extra.

    Args:
        project_dir: the folder holding lock/ (the code folder in the image).
        installed: name -> version to compare (default: this interpreter's packages).
    """
    runtime = project_dir / RUNTIME_LOCK
    if not runtime.is_file():
        return {"env.lock_digest": "missing", "env.matches_lock": "false"}
    text = runtime.read_text()
    dev = project_dir / DEV_LOCK
    known = [*(read_lock(dev.read_text()) if dev.is_file() else {}), *base_packages()]
    found = compare(
        read_lock(text), installed_versions() if installed is None else installed, known
    )
    return {
        "env.lock_digest": lock_digest(text),
        "env.matches_lock": str(found.matches).lower(),
        "env.mismatched_packages": shorten(found.mismatched),
        "env.extra_packages": shorten(found.extras),
    }


def main(argv: list[str] | None = None) -> int:
    """The command line `make env`, `make lock` and a curious person use."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="exit 1 naming `make lock` when a lock is out of date")
    commands.add_parser("stamp", help="write the inputs digest into every lock (make lock)")
    extras = commands.add_parser("extras", help="installed here but not in LOCK, one a line")
    extras.add_argument("lock")
    commands.add_parser("show", help="this environment's run tags, as JSON")
    args = parser.parse_args(argv)
    if args.command == "check":
        problem = stale_message()
        if problem:
            print(problem, file=sys.stderr)
        return 1 if problem else 0
    if args.command == "stamp":
        stamp()
    elif args.command == "extras":
        found = compare(read_lock(Path(args.lock).read_text()), installed_versions())
        print("\n".join(entry.split("==")[0] for entry in found.extras))
    else:
        print(json.dumps(tags(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
