"""What `make reproduce` needs from a run beyond its params and tags: which files it
trained on, and what could make a second run differ.

At run start the training loop calls `log_run_record(cfg, info)`: it writes
`reproduction/lineage.json` (each image file's path, label, split and the key the
dataset digest was computed over: path, size, modification time) and the run's
`determinism.*` tags (engine.devices.nondeterminism_tags). The MLflow dataset itself
keeps only the digest and the table's schema, not its rows.

Before re-training, `data_changes(lineage, digest)` recomputes that digest from the
files as they are now and names the files added, removed or changed since.

The reading side (everything but log_run_record) needs neither TensorFlow nor MLflow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.cache_store import file_key
from engine.common import image_files, text_digest

LINEAGE_ARTIFACT = "reproduction/lineage.json"


def log_run_record(cfg: Any, info: Any) -> None:
    """Log the lineage file and the determinism tags into the active run.

    Args:
        cfg: the run's Config.
        info: load_data's DataInfo (its lineage and pipeline_params).
    """
    # imported here: the reading side of this module stays free of TensorFlow and MLflow
    import mlflow

    from engine.devices import nondeterminism_tags

    pipeline = str(info.pipeline_params.get("data_pipeline", ""))
    mlflow.set_tags(nondeterminism_tags(cfg, pipeline))
    lineage = info.lineage or {}
    table = lineage.get("table")
    if not table:
        return
    # the keys the digest was computed over: a file touched since then is a change
    keys = lineage.get("keys") or [file_key(path) for path in table["path"]]
    rows = zip(table["path"], table["label"], table["split"], keys, strict=True)
    record = {
        "source": lineage.get("source", ""),
        "digest": lineage.get("digest", ""),
        "rows": [list(row) for row in rows],
    }
    mlflow.log_dict(record, LINEAGE_ARTIFACT)


@dataclass
class DataCheck:
    """How the files a run trained on compare with the files there now."""

    recorded_digest: str
    digest_now: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return self.recorded_digest == self.digest_now and not self.added

    def describe(self, shown: int = 5) -> str:
        """One phrase naming the files that differ, a few of each kind."""
        parts = []
        for kind, paths in (("changed", self.changed), ("removed", self.removed)):
            if paths:
                more = f" (+{len(paths) - shown} more)" if len(paths) > shown else ""
                parts.append(f"{len(paths)} {kind}: {', '.join(paths[:shown])}{more}")
        if self.added:
            more = f" (+{len(self.added) - shown} more)" if len(self.added) > shown else ""
            parts.append(f"{len(self.added)} added: {', '.join(self.added[:shown])}{more}")
        if not parts and self.recorded_digest != self.digest_now:
            parts.append("the recorded file list does not give the recorded digest")
        return "; ".join(parts) or "no file differs"


def data_changes(record: dict, recorded_digest: str, since: float = 0.0) -> DataCheck:
    """Recompute the dataset digest from the files now, and name what differs.

    Args:
        record: the run's lineage.json.
        recorded_digest: the digest of the run's MLflow dataset.
        since: when the run started (seconds since the epoch). A file in the data's
            folder that the run did not list counts as added only when it was modified
            after that: older ones were there and left out on purpose (a fork's load_data
            that takes a subset, an unreadable file skipped).

    Returns:
        The check: files changed (another size or modification time), removed, and added
        (image files in the data's folder now that the run did not list).
    """
    rows = record.get("rows", [])
    keys_now = [file_key(path) for path, _, _, _ in rows]
    digest_now = text_digest(
        "\t".join((key, label, split)) + "\n"
        for key, (_, label, split, _) in zip(keys_now, rows, strict=True)
    )
    check = DataCheck(recorded_digest, digest_now)
    for key, (path, _, _, recorded_key) in zip(keys_now, rows, strict=True):
        if key.endswith("|-1|-1"):
            check.removed.append(path)
        elif key != recorded_key:
            check.changed.append(path)
    folder = record.get("source", "")
    if folder and Path(folder).is_dir():
        listed = {os.path.abspath(path) for path, _, _, _ in rows}
        check.added = [
            p
            for p in image_files(folder)
            if os.path.abspath(p) not in listed and os.stat(p).st_mtime > since
        ]
    return check


def read_record(path: str | Path) -> dict:
    """A downloaded lineage.json."""
    return json.loads(Path(path).read_text())


# Folders a project keeps out of git that a fresh checkout of its commit needs: the data
# (data/ in this template) and the decoded-image cache, which is keyed by each file's
# path, size and time, so sharing it cannot mix up data.
SHARED_FOLDERS = ("data", ".cache")


def share_untracked(project: Path, checkout: Path) -> list[str]:
    """Link the project's SHARED_FOLDERS into a fresh checkout that lacks them.

    Returns:
        A note for each folder linked.
    """
    notes = []
    for name in SHARED_FOLDERS:
        if (project / name).is_dir() and not (checkout / name).exists():
            (checkout / name).symlink_to((project / name).resolve(), target_is_directory=True)
            notes.append(f"{name}/: this project's, linked into the checkout (git keeps it out)")
    return notes
