"""Helpers the host and the container both need, written once, with no heavy imports.

The host side (project_driver.py, host/, lifecycle.py's parser) imports this module
without paying for TensorFlow, Keras or MLflow: it uses the standard library only.

    PROJECT_DIR         the project folder (this template's checkout, or the image's copy)
    storage_folder      /storage/<name> when /storage is writable, else the project's own
    local_path          the local folder of a file:// or plain-path artifact URI
    check_tracking_uri  a tracking URI of a known scheme whose server answers
    list_images         the image files under a folder: the one listing every path uses
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import UserError

PROJECT_DIR = Path(__file__).resolve().parent.parent
STORAGE_ROOT = Path("/storage")
# engine/checkpoints.py writes it last; the host reads it to decide whether to resume.
CHECKPOINT_STATE = "state.json"
# The signals that asked this process to stop, appended by engine.cli's handler. The
# SystemExit that handler raises is lost when the signal lands while Python runs a
# __del__ or a callback from TensorFlow's C++; training checks this list after every
# batch (engine.checkpoints.StopOnSignal), so a stop is never lost.
STOP_SIGNALS: list[int] = []
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
# URI schemes a run can log to; a database scheme may name a driver (postgresql+psycopg2).
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def storage_folder(name: str, fallback: str) -> Path:
    """/storage/<name> when /storage is a writable folder (shared by containers), else
    <project>/<fallback>.

    Args:
        name: the sub-folder of /storage (cache, checkpoints, tune).
        fallback: the path under the project folder to use otherwise.
    """
    if STORAGE_ROOT.is_dir() and os.access(STORAGE_ROOT, os.W_OK):
        return STORAGE_ROOT / name
    return PROJECT_DIR / fallback


def local_path(uri: str, base: Path | None = None) -> Path | None:
    """The local folder of a file:// or plain-path artifact URI; None for a store reached
    over the network (mlflow-artifacts:, s3:, ...).

    Args:
        uri: the artifact URI or location.
        base: a relative plain path is taken under it (as is, when None).
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "file":
        return Path(urllib.parse.unquote(parts.path))
    if parts.scheme == "" and uri:
        return base / uri if base is not None else Path(uri)
    return None


def check_tracking_uri(
    uri: str, timeout: float = 5.0, outcome: str = "Nothing was trained."
) -> None:
    """Raise UserError unless uri is a tracking URI of a known scheme whose server answers.

    http(s): GET /health answers within `timeout` (any HTTP answer counts, an auth proxy's
    401 too); a database: its host accepts a TCP connection; sqlite: nothing to reach.

    Args:
        uri: the tracking URI.
        timeout: seconds to wait for an answer.
        outcome: the last sentence of the message, what did not happen.
    """
    parts = urllib.parse.urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()
    if "://" not in uri or scheme not in TRACKING_SCHEMES:
        hint = f" (did you mean http://{uri}?)" if re.fullmatch(r"[\w.\-]+:\d+/?", uri) else ""
        raise UserError(
            f"MLFLOW_TRACKING_URI '{uri}' is not a tracking URI this template can log to"
            f"{hint}. Use http(s)://HOST:PORT for a tracking server, sqlite:///PATH/mlflow.db "
            "for a local file, postgresql://USER:PASSWORD@HOST:PORT/DB for a database, or "
            f"unset it to log to the local store in this folder. {outcome}"
        )
    try:
        if scheme in ("http", "https"):
            with contextlib.suppress(urllib.error.HTTPError):
                urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)
        elif scheme not in ("sqlite", "databricks") and parts.hostname:
            default_ports = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
            port = parts.port or default_ports[scheme]
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"the MLflow tracking server at {uri} is unreachable ({reason}). Start it "
            "(`make server` serves http://127.0.0.1:5000), fix MLFLOW_TRACKING_URI, or unset "
            f"it to log to the local store in this folder. {outcome}"
        ) from None


@dataclass
class ImageListing:
    """What list_images found: the image files, and the links it did not follow."""

    files: list[str] = field(default_factory=list)
    loops: int = 0  # links back to a folder already listed (each file is listed once)
    outside: int = 0  # links leading out of the listed folder

    @property
    def skipped_links(self) -> int:
        return self.loops + self.outside

    def describe_skipped(self, folder: Path | str) -> str:
        """One line on the skipped links, or "" when none was skipped."""
        if not self.skipped_links:
            return ""
        parts = [f"{self.loops} back to a folder or file already listed"] if self.loops else []
        if self.outside:
            parts.append(f"{self.outside} leading out of {folder}")
        follow = " (--follow-links-out true follows links out)" if self.outside else ""
        return (
            f"{folder}: skipped {self.skipped_links} link(s) ({', '.join(parts)}); "
            f"each image file is read once, from inside its own folder{follow}"
        )


def list_images(folder: Path | str, follow_links_out: bool = False) -> ImageListing:
    """The image files under folder, at any depth, each real file once, sorted.

    Links are followed while they stay inside folder; a link back to a folder or file
    already listed (a loop such as `a/loop -> .`) is skipped, and so is a link that leads
    out of folder (`a/up -> ..` would hand class b's files the label a) unless
    follow_links_out. Names are visited in sorted order, so the path kept for a file
    reached twice is always the same one.

    Args:
        folder: the folder to list.
        follow_links_out: follow links whose target lies outside folder too.

    Returns:
        The listing: paths joined onto folder as given (os.walk: 3x pathlib's speed).
    """
    root = os.path.realpath(folder)
    listing = ImageListing()
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()

    def inside(real: str) -> bool:
        return follow_links_out or real == root or real.startswith(root.rstrip(os.sep) + os.sep)

    for parent, dirs, names in os.walk(folder, followlinks=True):
        real_parent = os.path.realpath(parent)
        if real_parent in seen_dirs:  # reached again through a link: listed already
            listing.loops += 1
            dirs[:] = []
            continue
        seen_dirs.add(real_parent)
        kept = []
        for name in sorted(
            dirs, key=lambda name: (os.path.islink(os.path.join(parent, name)), name)
        ):
            real = os.path.realpath(os.path.join(parent, name))
            if not inside(real):
                listing.outside += 1
            elif real in seen_dirs or (root + os.sep).startswith(real + os.sep):
                listing.loops += 1  # the folder itself or one above it: a loop
            else:
                kept.append(name)
        dirs[:] = kept
        for name in sorted(
            names, key=lambda name: (os.path.islink(os.path.join(parent, name)), name)
        ):
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(parent, name)
            real = os.path.realpath(path)
            if not inside(real):
                listing.outside += 1
            elif real in seen_files:
                listing.loops += 1
            else:
                seen_files.add(real)
                listing.files.append(path)
    listing.files.sort()
    return listing


def image_files(folder: Path | str) -> list[str]:
    """The image files under folder: list_images(folder).files."""
    return list_images(folder).files


def text_digest(lines) -> str:
    """A short content hash of lines of text: the dataset digest (engine.images) and its
    recomputation before `make reproduce` (engine.run_record), which needs no TensorFlow."""
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode())
    return digest.hexdigest()[:16]
