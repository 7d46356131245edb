"""The decoded-image cache every run shares (--cache-dir; --cache false turns it off).

Images are decoded once, resized to the run's size and channels, and kept on disk as
uint8, so a second run, a sweep, a tuning trial or `validate` on the same data
decodes nothing. Entries are keyed one image each: an image file by its path, size
and modification time (`file_key`), a TFDS example by dataset, version, split and
index. A changed file has a new key, so only it is decoded again; files that
failed are kept with their reason, so a warm run reports the same skipped files.

On disk, one folder per (image size, channels, DECODER_VERSION) holds shards: each
a `.npy` array of images and a `.json` list of their keys, labels and failures,
each written to a temporary file and renamed into place (the `.json` last, so a
shard exists only once whole). A lock file (fcntl.flock) lets many runs read at
once and one write: a run that has to decode waits for a writer and then reads
what it wrote. A writer first removes what dead writers left (temporary files, an
`.npy` without its `.json`), and a write that fails (disk full, quota, permissions)
removes its part-written shard and turns the disk cache off for that run alone.

Modes: files 0664 and folders 2775 (group-writable, setgid so new files keep the
folder's group): containers that run as different users of one group (e.g.
`docker run --group-add`) share a /storage/cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.cache_folder import FILE_MODE, locked, make_folder
from engine.common import storage_folder
from engine.config import UserError
from engine.decoding import DECODER_VERSION

SHARD_IMAGES = 8192  # images per shard at most: a changed file rewrites no more than one


@dataclass
class Decoded:
    """Images decoded for a list of keys, in the keys' order."""

    images: np.ndarray  # (N, H, W, C) uint8, zeros where an image failed
    labels: np.ndarray  # (N,) int64 labels stored with the images, -1 where none
    failures: dict[int, str] = field(default_factory=dict)  # key index -> reason

    def ok(self) -> np.ndarray:
        """A boolean mask of the images that decoded."""
        mask = np.ones(len(self.images), bool)
        mask[list(self.failures)] = False
        return mask


Decode = Callable[[list[int]], Decoded]  # indices of the keys to decode -> their images


def default_cache_dir() -> Path:
    """/storage/cache when /storage is writable (shared by containers), else the project's."""
    return storage_folder("cache", ".cache/images")


def file_key(path: str) -> str:
    """An image file's cache key: absolute path, size and modification time (ns)."""
    if not path.startswith("/") or "/." in path or "//" in path:
        path = os.path.abspath(path)  # (most paths are absolute and normal already)
    try:
        stat = os.stat(path)
    except OSError:
        return f"{path}|-1|-1"
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _stale(key: str) -> bool:
    """A file's entry whose file has since changed or gone (other keys never go stale)."""
    return key.startswith("/") and file_key(key.rsplit("|", 2)[0]) != key


class ImageCache:
    """The cache's folder for one image size and channel count.

    Args:
        root: the cache directory (cfg.cache_dir, or default_cache_dir() when empty).
    """

    def __init__(self, root: str | Path, image_size: int, channels: int):
        self.root = Path(root).expanduser()
        self.folder = self.root / f"{image_size}px-{channels}ch-v{DECODER_VERSION}"
        self.shape = (image_size, image_size, channels)

    # -- reading ---------------------------------------------------------------

    def _index(self) -> dict[str, tuple[str, int] | str]:
        """key -> (shard name, row) for an image, or the reason it failed."""
        index: dict[str, tuple[str, int] | str] = {}
        for meta_path in sorted(self.folder.glob("*.json")):
            meta = json.loads(meta_path.read_text())
            index.update((key, (meta_path.stem, row)) for row, key in enumerate(meta["keys"]))
            index.update(meta["failed"])
        return index

    def _labels(self, shard: str) -> list[int]:
        return json.loads((self.folder / f"{shard}.json").read_text())["labels"]

    def _gather(self, index: dict, keys: list[str], positions: list[int], out: Decoded) -> None:
        """Fill out[positions] with the cached entries of those keys."""
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position in positions:
            entry = index[keys[position]]
            if isinstance(entry, str):
                out.failures[position] = entry
            else:
                by_shard.setdefault(entry[0], []).append((position, entry[1]))
        for shard, pairs in by_shard.items():
            where, rows = (np.array(v) for v in zip(*pairs, strict=True))
            images = np.load(self.folder / f"{shard}.npy", mmap_mode="r")
            everything = np.arange(len(out.images))
            if (
                len(images) == len(where) == len(everything)
                and (where == everything).all()
                and (rows == everything).all()
            ):  # the whole shard, in order: the pipelines copy out of the map itself
                out.images = images
            else:
                order = np.argsort(rows)  # read the memory map front to back
                out.images[where[order]] = images[rows[order]]
            out.labels[where] = np.asarray(self._labels(shard), np.int64)[rows]

    # -- writing ---------------------------------------------------------------

    def _write(
        self, keys: list[str], images: np.ndarray, labels: np.ndarray, failed: dict[str, str]
    ) -> int:
        """Store images (one per key, with labels) and failures as new shards; returns bytes.

        A shard whose write fails is removed whole (its .npy without a .json would be an
        orphan) and the error raised; shards written before it stay, complete.
        """
        written = 0
        for start in range(0, max(len(keys), 1), SHARD_IMAGES):
            rows = slice(start, start + SHARD_IMAGES)
            meta = {
                "keys": keys[rows],
                "labels": [int(v) for v in labels[rows]],
                "failed": failed if start == 0 else {},
            }
            name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
            try:
                written += self._atomic(f"{name}.npy", lambda f, r=rows: np.save(f, images[r]))
                text = json.dumps(meta).encode()
                written += self._atomic(f"{name}.json", lambda f, t=text: f.write(t))
            except BaseException:
                (self.folder / f"{name}.npy").unlink(missing_ok=True)
                raise
        return written

    def _atomic(self, name: str, write: Callable) -> int:
        """Write a file under a temporary name, then rename it into place."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, self.folder / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return (self.folder / name).stat().st_size

    def _compact(self, since: int) -> None:
        """Rewrite the shards that mostly hold files since changed or gone, without those.

        Shards written at or after `since` (time.time_ns()) are fresh and left alone.
        """
        for meta_path in sorted(self.folder.glob("*.json")):
            if int(meta_path.stem.split("-")[0]) >= since:
                continue
            meta = json.loads(meta_path.read_text())
            live = [row for row, key in enumerate(meta["keys"]) if not _stale(key)]
            if meta["keys"]:
                worth_it = len(live) * 2 < len(meta["keys"])
            else:  # a shard of failures only
                worth_it = any(map(_stale, meta["failed"]))
            if not worth_it:
                continue
            failed = {k: v for k, v in meta["failed"].items() if not _stale(k)}
            if live or failed:
                images = np.load(meta_path.with_suffix(".npy"), mmap_mode="r")[live]
                labels = np.asarray(meta["labels"], np.int64)[live]
                self._write([meta["keys"][row] for row in live], images, labels, failed)
            meta_path.unlink()  # the .json first: without it the shard is not there
            meta_path.with_suffix(".npy").unlink(missing_ok=True)

    def remove_leftovers(self) -> int:
        """Remove what writers that died left: temporary files, and `.npy` files whose
        `.json` was never written. Called with the exclusive lock held, so no writer is
        at work. Returns the bytes freed."""
        freed = 0
        for leftover in self.folder.glob(".tmp-*"):
            freed += leftover.stat().st_size
            leftover.unlink(missing_ok=True)
        for array in self.folder.glob("*.npy"):
            if not array.with_suffix(".json").exists():
                freed += array.stat().st_size
                array.unlink(missing_ok=True)
        return freed

    def size_bytes(self) -> int:
        """Bytes the cache's shards take, over all sizes and channel counts."""
        return sum(p.stat().st_size for p in self.root.glob("*/*") if not p.name.startswith("."))

    def _decode_and_store(
        self, keys: list[str], missing: list[int], decode: Decode, out: Decoded
    ) -> None:
        """Decode the keys at positions `missing` into out and write them as new shards."""
        started = time.time_ns()
        new = decode(missing)
        try:
            self._store(keys, missing, new)
            self._compact(since=started)
        except OSError as err:
            # Space, quota, permissions: the images are decoded; this run goes on without
            # writing them (the next run tries again).
            print(
                f"cache: cannot write to {self.folder} ({err.strerror or err}); this run "
                "goes on without the disk cache"
            )
        if len(missing) == len(keys):
            out.images, out.labels = new.images, new.labels
        else:
            out.images[missing], out.labels[missing] = new.images, new.labels
        out.failures.update({missing[i]: why for i, why in new.failures.items()})

    def _store(self, keys: list[str], missing: list[int], new: Decoded) -> None:
        """Write the newly decoded images of keys[missing] (and their failures) as shards."""
        self.remove_leftovers()
        ok = np.flatnonzero(new.ok())
        failed = {keys[missing[i]]: why for i, why in new.failures.items()}
        if len(ok) == len(missing):  # no failures: no copy of the images
            written = self._write([keys[i] for i in missing], new.images, new.labels, failed)
        else:
            ok_keys = [keys[missing[i]] for i in ok]
            written = self._write(ok_keys, new.images[ok], new.labels[ok], failed)
        print(
            f"cache: wrote {len(missing)} images ({written / 1e6:.1f} MB) to {self.folder}; "
            f"the cache holds {self.size_bytes() / 1e6:.1f} MB"
        )

    # -- the one entry point -----------------------------------------------------

    def load(self, keys: list[str], decode: Decode) -> Decoded:
        """The images of keys: read from the cache, the missing ones decoded and stored."""
        try:
            make_folder(self.folder)
        except OSError as err:
            raise UserError(
                f"cannot create the image cache {self.folder} ({err.strerror}). Give a "
                "writable folder with --cache-dir, or turn the cache off with --cache false."
            ) from err
        out = Decoded(np.zeros((len(keys), *self.shape), np.uint8), -np.ones(len(keys), np.int64))
        with locked(self.folder, exclusive=False):
            index = self._index()
            missing = [i for i, key in enumerate(keys) if key not in index]
            if not missing:
                self._gather(index, keys, list(range(len(keys))), out)
        if missing:
            # One run decodes and writes; a run arriving meanwhile waits, then reads.
            with locked(self.folder, exclusive=True):
                index = self._index()
                missing = [i for i, key in enumerate(keys) if key not in index]
                hits = [i for i, key in enumerate(keys) if key in index]
                self._gather(index, keys, hits, out)
                if missing:
                    self._decode_and_store(keys, missing, decode, out)
        print(
            f"cache: read {len(keys) - len(missing)} decoded images from {self.folder} "
            f"({len(missing)} decoded)"
        )
        return out


def load_images(keys: list[str], decode: Decode, cache: bool, cache_dir: str, shape) -> Decoded:
    """Decoded images for keys, through the disk cache when cache is on.

    Args:
        shape: (image_size, image_size, channels) the images are resized to.

    Raises:
        UserError: cache_dir was given and cannot be created. An unwritable default
            only turns the disk cache off, with a note.
    """
    if not cache:
        return decode(list(range(len(keys))))
    store = ImageCache(cache_dir or default_cache_dir(), shape[0], shape[2])
    if not cache_dir:
        try:
            make_folder(store.folder)
        except OSError as err:
            print(
                f"note: cannot write the image cache {store.folder} ({err.strerror}); "
                "decoding without it (--cache-dir names a writable one)"
            )
            return decode(list(range(len(keys))))
    try:
        return store.load(keys, decode)
    except OSError as err:  # e.g. a lock or shard this user cannot open
        print(f"cache: cannot use {store.folder} ({err.strerror or err}); decoding without it")
        return decode(list(range(len(keys))))


def clean(cache_dir: str = "") -> int:
    """Empty the cache (`make cache-clean`), each folder under its lock; returns exit status 0."""
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    freed = 0
    for folder in sorted(p for p in root.glob("*px-*ch-v*") if p.is_dir()):
        with locked(folder, exclusive=True):
            for item in folder.iterdir():
                if item.name != ".lock":
                    freed += item.stat().st_size
                    item.unlink()
    print(f"cache: removed {freed / 1e6:.1f} MB of decoded images from {root}")
    return 0
