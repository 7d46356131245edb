"""The decoded-image cache every run shares (--cache-dir; --cache false turns it off).

Images are decoded once, resized to the run's size and channels, and kept on disk as
uint8, so a second run, a sweep, a tuning trial or `validate` on the same data
decodes nothing. Entries are keyed one image each: an image file by its path, size
and modification time (`file_key`), a TFDS example by dataset, version, split and
index. A changed file has a new key, so only it is decoded again; files that
failed are kept with their reason, so a warm run reports the same skipped files.

On disk, one folder per (image size, channels, DECODER_VERSION) holds shards
(engine.shards): each a `.npy` array of images and a `.json` list of their keys,
labels, failures and checksums, written a piece at a time as images are decoded (a
cold run holds a piece of them, never the whole set) and renamed into place whole.
A lock file (fcntl.flock) lets many runs read at once and one write: a run that has
to decode waits for a writer and then reads what it wrote. A writer first removes
what dead writers left (temporary files, an `.npy` without its `.json`), and a write
that fails (disk full, quota, permissions) removes its part-written shard and turns
the disk cache off for that run alone. A shard found truncated or damaged (its size,
or its checksum where it is read whole) is removed, said in one line, and its images
decoded again from their source.

Two ways out: `load` reads the images into memory (Decoded), `locate` leaves them on
disk and says where each one lies (Located, which engine.stream reads batch by batch).

Modes: files 0664 and folders 2775 (group-writable, setgid so new files keep the
folder's group): containers that run as different users of one group (e.g.
`docker run --group-add`) share a /storage/cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# FILE_MODE, SHARD_IMAGES and file_key are re-exported: callers found them here
from engine.cache_folder import FILE_MODE, locked, make_folder  # noqa: F401
from engine.cache_store import Decode, cannot_write, decode_and_store, file_key  # noqa: F401
from engine.common import storage_folder
from engine.config import UserError
from engine.decoding import DECODER_VERSION, aligned_zeros
from engine.shards import SHARD_IMAGES, Decoded, Located, Shard, open_shard, read_rows  # noqa: F401

Index = dict[str, tuple[str, int] | str]  # key -> (shard name, row), or why it failed


def default_cache_dir() -> Path:
    """/storage/cache when /storage is writable (shared by containers), else the project's."""
    return storage_folder("cache", ".cache/images")


class ImageCache:
    """The cache's folder for one image size and channel count.

    Args:
        root: the cache directory (cfg.cache_dir, or default_cache_dir() when empty).
    """

    def __init__(self, root: str | Path, image_size: int, channels: int):
        self.root = Path(root).expanduser()
        self.folder = self.root / f"{image_size}px-{channels}ch-v{DECODER_VERSION}"
        self.shape = (image_size, image_size, channels)
        self.bad: dict[str, str] = {}  # shards found damaged -> why, until removed
        self._metas: dict[str, dict] = {}  # shard name -> its .json, as last indexed

    # -- reading ---------------------------------------------------------------

    def _index(self) -> Index:
        """key -> (shard name, row) for an image, or the reason it failed; damaged
        shards left out."""
        index: Index = {}
        self._metas = {}
        for meta_path in sorted(self.folder.glob("*.json")):
            if meta_path.stem in self.bad:
                continue
            meta = json.loads(meta_path.read_text())
            index.update((key, (meta_path.stem, row)) for row, key in enumerate(meta["keys"]))
            index.update(meta["failed"])
            self._metas[meta_path.stem] = meta
        return index

    def _open(self, name: str) -> Shard | None:
        """A shard of the index, opened and checked; None (and noted in self.bad) if damaged."""
        shard = open_shard(self.folder, name, self._metas[name], self.shape)
        if isinstance(shard, str):
            self.bad[name] = shard
            return None
        return shard

    def _gather(self, index: Index, keys: list[str], todo: np.ndarray, out: Decoded) -> None:
        """Read the cached entries of keys at the positions todo marks into out, and unmark
        them; those of damaged shards stay marked."""
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position in np.flatnonzero(todo).tolist():
            entry = index.get(keys[position])
            if isinstance(entry, str):
                out.failures[position] = entry
                todo[position] = False
            elif entry is not None:
                by_shard.setdefault(entry[0], []).append((position, entry[1]))
        for name, pairs in by_shard.items():
            where, rows = (np.array(v) for v in zip(*pairs, strict=True))
            shard = self._open(name)
            if shard is None:
                continue
            try:
                whole = read_rows(shard, rows, out.images, where)
            finally:
                shard.close()
            if not whole:
                self.bad[name] = "fails its checksum"
                continue
            out.labels[where] = np.asarray(self._metas[name]["labels"], np.int64)[rows]
            todo[where] = False

    def _locate(self, index: Index, keys: list[str]) -> Located | None:
        """Every key's shard and row, its shard opened and checked; None if one is damaged
        or a key is not cached."""
        names: dict[str, int] = {}
        unknown = np.full(len(keys), -1, np.int64)
        located = Located([], unknown, np.zeros(len(keys), np.int64), unknown.copy())
        for position, key in enumerate(keys):
            entry = index.get(key)
            if entry is None:
                located.close()
                return None
            if isinstance(entry, str):
                located.failures[position] = entry
                continue
            name, row = entry
            if name not in names:
                shard = self._open(name)
                if shard is None:
                    continue
                names[name] = len(located.shards)
                located.shards.append(shard)
            located.shard[position], located.row[position] = names[name], row
            located.labels[position] = self._metas[name]["labels"][row]
        if self.bad:
            located.close()
            return None
        return located

    def _drop_bad(self, keys: list[str]) -> None:
        """Remove the damaged shards (with the exclusive lock held), one line each."""
        wanted = set(keys)
        for name, why in sorted(self.bad.items()):
            meta_path = self.folder / f"{name}.json"
            if meta_path.exists():
                used = sum(key in wanted for key in json.loads(meta_path.read_text())["keys"])
                meta_path.unlink()  # the .json first: without it the shard is not there
                (self.folder / f"{name}.npy").unlink(missing_ok=True)
                print(
                    f"cache: shard {name}.npy in {self.folder} {why}; removed, and its "
                    f"{used} image(s) this run uses are decoded again"
                )
        self.bad = {}

    def _store(self, keys: list[str], missing: list[int], decode: Decode, out) -> bool:
        return decode_and_store(self.folder, self.shape, keys, missing, decode, out)

    # -- the two entry points ----------------------------------------------------

    def _make(self) -> None:
        try:
            make_folder(self.folder)
        except OSError as err:
            raise UserError(
                f"cannot create the image cache {self.folder} ({err.strerror}). Give a "
                "writable folder with --cache-dir, or turn the cache off with --cache false."
            ) from err

    def load(self, keys: list[str], decode: Decode) -> Decoded:
        """The images of keys in memory: read from the cache, the missing ones decoded and
        stored."""
        self._make()
        out = Decoded(aligned_zeros((len(keys), *self.shape)), -np.ones(len(keys), np.int64))
        todo = np.ones(len(keys), bool)  # positions not read yet
        with locked(self.folder, exclusive=False):
            index = self._index()
            if all(key in index for key in keys):
                self._gather(index, keys, todo, out)
        missing: list[int] = []
        if todo.any():
            # One run decodes and writes; a run arriving meanwhile waits, then reads.
            with locked(self.folder, exclusive=True):
                self._drop_bad(keys)
                self._gather(self._index(), keys, todo, out)
                self._drop_bad(keys)
                missing = np.flatnonzero(todo).tolist()
                if missing:
                    self._store(keys, missing, decode, out)
        print(
            f"cache: read {len(keys) - len(missing)} decoded images from {self.folder} "
            f"({len(missing)} decoded)"
        )
        return out

    def locate(self, keys: list[str], decode: Decode) -> Located | None:
        """Where the images of keys lie on disk: the missing ones decoded and stored first.
        None when they could not be written (the caller then decodes into memory)."""
        self._make()
        with locked(self.folder, exclusive=False):
            located = self._locate(self._index(), keys)
        missing: list[int] = []
        if located is None:
            with locked(self.folder, exclusive=True):
                for _ in range(2):  # a damaged shard found on the way: removed, decoded again
                    self._drop_bad(keys)
                    index = self._index()
                    new = [i for i, key in enumerate(keys) if key not in index]
                    if new and not self._store(keys, new, decode, None):
                        return None
                    missing += new
                    located = self._locate(self._index(), keys)
                    if located is not None:
                        break
            if located is None:  # shards just written are damaged: no disk to trust
                cannot_write(self.folder, OSError(f"its new shards are damaged: {self.bad}"))
                return None
        print(
            f"cache: read {len(keys) - len(missing)} decoded images from {self.folder} "
            f"({len(missing)} decoded)"
        )
        return located


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


def locate_images(
    keys: list[str], decode: Decode, cache: bool, cache_dir: str, shape
) -> Located | None:
    """Where the decoded images of keys lie in the disk cache, decoding the missing ones.

    Returns:
        None where there is no disk cache to stream from: --cache false, an unwritable
        default cache folder, or a write that failed (each said on the console); the
        caller then holds the images in memory (load_images).

    Raises:
        UserError: cache_dir was given and cannot be created.
    """
    if not cache:
        print("note: --cache false leaves no disk cache to stream the images from")
        return None
    store = ImageCache(cache_dir or default_cache_dir(), shape[0], shape[2])
    if not cache_dir:
        try:
            make_folder(store.folder)
        except OSError as err:
            print(f"note: cannot write the image cache {store.folder} ({err.strerror})")
            return None
    try:
        return store.locate(keys, decode)
    except OSError as err:  # e.g. a lock or shard this user cannot open
        print(f"cache: cannot use {store.folder} ({err.strerror or err})")
        return None


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
