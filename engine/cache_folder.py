"""How runs share a cache folder: its lock, and the modes that let users of one group in.

Files are written 0664 and folders 2775 (group-writable, setgid so new files keep the
folder's group): containers that run as different users of one group (e.g.
`docker run --group-add`) share a /storage/cache. The lock (fcntl.flock on `.lock`, mode
0666) lets many runs read at once and one write.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

FILE_MODE = 0o664
FOLDER_MODE = 0o2775


@contextlib.contextmanager
def locked(folder: Path, exclusive: bool) -> Iterator[None]:
    """Hold folder's lock: shared to read, exclusive to write; say so when waiting."""
    lock_path = folder / ".lock"
    created = not lock_path.exists()
    try:
        lock = open(lock_path, "a+")  # noqa: SIM115 (closed below)
    except PermissionError:  # a cache this user may only read: a shared lock still works
        lock = open(lock_path)  # noqa: SIM115
    with lock:
        if created:  # every user of a shared cache opens it to lock
            with contextlib.suppress(OSError):
                os.chmod(lock_path, 0o666)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(lock, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"cache: waiting for another run writing {folder} ...", flush=True)
            fcntl.flock(lock, mode)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def make_folder(folder: Path) -> None:
    """Create folder and its missing parents with FOLDER_MODE (a shared cache's mode)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for created in missing:
        with contextlib.suppress(OSError):  # another user's run may have made it
            os.chmod(created, FOLDER_MODE)
