"""The decoded-image cache's shards on disk: written a piece at a time, checked, read by row.

A shard is `<name>.npy`, a uint8 (rows, size, size, channels) array, and `<name>.json`:
its keys (one per row), labels, failures, and since issue 25 its `rows` and `crc32`,
the zlib.crc32 of each CRC_BLOCK bytes of its pixels (blocks, so that they can be
checked in parallel). Both files are written under temporary names and renamed into
place, the `.json` last, so a shard exists only once whole.

ShardWriter appends decoded images as they come, so decoding never holds more than
one piece of the data: the `.npy` header is written first for SHARD_IMAGES rows and
rewritten, padded to the same length, for the rows the shard got when it closes.

open_shard checks a shard before it is read: its header, and its size against its
rows (a truncated shard is found by one fstat). The checksums are checked where the
whole shard is read anyway (read_rows, the in-memory pipeline: about 1.4 GB/s a
core, on every core); rows read one by one (the stream) are checked by size only.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.cache_folder import FILE_MODE

SHARD_IMAGES = 8192  # images per shard at most: a changed file rewrites no more than one
CRC_BLOCK = 4 << 20  # bytes of pixels each checksum covers
_MAGIC = b"\x93NUMPY\x01\x00"


def npy_header(rows: int, shape: tuple[int, ...], length: int = 0) -> bytes:
    """A .npy (version 1.0) header of a uint8 (rows, *shape) array, padded with spaces to
    `length` bytes (0: the next multiple of 64, as numpy writes it)."""
    fields = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {(rows, *shape)}, }}"
    size = length or -(-(len(_MAGIC) + 2 + len(fields) + 1) // 64) * 64
    padding = size - len(_MAGIC) - 2 - len(fields) - 1
    if padding < 0:
        raise ValueError(f"a header for {rows} rows does not fit in {size} bytes")
    text = (fields + " " * padding + "\n").encode("latin1")
    return _MAGIC + len(text).to_bytes(2, "little") + text


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


class Checksum:
    """zlib.crc32 of each CRC_BLOCK bytes of a stream of bytes, fed in pieces of any size."""

    def __init__(self):
        self.values: list[int] = []
        self._crc, self._filled = 0, 0

    def update(self, data) -> None:
        data = memoryview(data).cast("B")
        at = 0
        while at < len(data):
            take = min(CRC_BLOCK - self._filled, len(data) - at)
            self._crc = zlib.crc32(data[at : at + take], self._crc)
            self._filled, at = self._filled + take, at + take
            if self._filled == CRC_BLOCK:
                self.values.append(self._crc)
                self._crc, self._filled = 0, 0

    def result(self) -> list[int]:
        return self.values + ([self._crc] if self._filled else [])


@functools.cache
def _pool(pid: int) -> ThreadPoolExecutor:
    """Threads for checksums (zlib lets go of the GIL over large buffers); one pool per
    process id, since a forked child has none of its parent's threads."""
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def checksums(data) -> list[int]:
    """Checksum(data).result(), computed on several cores at once."""
    data = memoryview(data).cast("B")
    blocks = [data[at : at + CRC_BLOCK] for at in range(0, len(data), CRC_BLOCK)]
    return list(_pool(os.getpid()).map(zlib.crc32, blocks))


class ShardWriter:
    """Images appended a piece at a time into new shards of a cache folder.

    Each shard is written to temporary files and renamed into place when it has
    SHARD_IMAGES rows or the writer closes; `abort` removes a part-written one.
    """

    def __init__(self, folder: Path, shape: tuple[int, int, int]):
        self.folder, self.shape = folder, shape
        self.header_length = len(npy_header(SHARD_IMAGES, shape))
        self.written = 0  # bytes of the shards put in place
        self.names: list[str] = []
        self._file = None
        self._meta: dict = {}

    def _start(self) -> None:
        fd, self._tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
        self._file = os.fdopen(fd, "wb")
        self._file.write(b"\0" * self.header_length)
        self._meta = {"keys": [], "labels": [], "failed": {}}
        self._checksum = Checksum()

    def add(self, keys: list[str], images: np.ndarray, labels, failed: dict[str, str]) -> None:
        """Append images (one per key, with their labels) and failures (key -> reason)."""
        if self._file is None:
            self._start()
        self._meta["failed"].update(failed)
        done = 0
        while done < len(keys):
            if len(self._meta["keys"]) == SHARD_IMAGES:
                self._finish()
                self._start()
            take = min(SHARD_IMAGES - len(self._meta["keys"]), len(keys) - done)
            block = np.ascontiguousarray(images[done : done + take])
            self._file.write(block.data)
            self._checksum.update(block.data)
            self._meta["keys"] += keys[done : done + take]
            self._meta["labels"] += [int(v) for v in labels[done : done + take]]
            done += take

    def _finish(self) -> None:
        """Put the shard being written in place: header, .npy, then .json."""
        rows = len(self._meta["keys"])
        self._file.seek(0)
        self._file.write(npy_header(rows, self.shape, self.header_length))
        self._file.close()
        self._file = None
        name = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
        npy = self.folder / f"{name}.npy"
        os.chmod(self._tmp, FILE_MODE)
        os.replace(self._tmp, npy)
        meta = {**self._meta, "rows": rows, "crc32": self._checksum.result()}
        try:
            self.written += npy.stat().st_size + write_atomic(
                self.folder / f"{name}.json", json.dumps(meta).encode()
            )
        except BaseException:
            npy.unlink(missing_ok=True)  # an .npy without its .json is an orphan
            raise
        self.names.append(name)

    def close(self) -> None:
        """Put the last shard in place (one of failures only, too)."""
        if self._file is not None:
            if self._meta["keys"] or self._meta["failed"]:
                self._finish()
            else:
                self.abort()

    def abort(self) -> None:
        """Remove the shard being written, if any (shards already in place stay)."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._file = None


def write_atomic(path: Path, data: bytes) -> int:
    """Write a small file under a temporary name, then rename it into place; its size."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return len(data)


@dataclass
class Shard:
    """An open shard: reads go to its file descriptor, which keeps it readable even if
    another run replaces or removes the file meanwhile."""

    name: str
    fd: int
    offset: int  # where row 0 starts
    rows: int
    crc32: list[int] | None  # per CRC_BLOCK; None: written before shards had checksums

    def close(self) -> None:
        """Close the file once (its number may be another file's afterwards)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class Located:
    """Where the decoded images of a list of keys lie: open shards, and each key's row.

    The shards stay open (and so readable, even if another run removes them) until
    close(); engine.stream reads rows of them by index.
    """

    shards: list[Shard]
    shard: np.ndarray  # (N,) int64: each key's index into shards, -1 where it failed
    row: np.ndarray  # (N,) int64: its row in that shard
    labels: np.ndarray  # (N,) int64: the labels stored with the images, -1 where none
    failures: dict[int, str] = field(default_factory=dict)  # key index -> reason

    def ok(self) -> np.ndarray:
        """A boolean mask of the images that decoded."""
        return self.shard >= 0

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __del__(self) -> None:  # the pipelines that read the shards are gone
        self.close()


def open_shard(folder: Path, name: str, meta: dict, shape: tuple[int, ...]) -> Shard | str:
    """Open a shard and check its header and size; the Shard, or why it is unusable."""
    rows = len(meta["keys"])
    try:
        fd = os.open(folder / f"{name}.npy", os.O_RDONLY)
    except FileNotFoundError:
        return "is missing its .npy file"
    try:
        start = os.pread(fd, 10, 0)
        length = int.from_bytes(start[8:10], "little") if start[:8] == _MAGIC else -1
        header = os.pread(fd, max(length, 0), 10).decode("latin1")
        if length < 0 or f"'shape': {(rows, *shape)}" not in header or "|u1" not in header:
            os.close(fd)
            return "has a damaged header"
        size, want = os.fstat(fd).st_size, 10 + length + rows * int(np.prod(shape))
        if size != want:
            os.close(fd)
            return f"is {'truncated' if size < want else 'too long'} ({size} of {want} bytes)"
    except (OSError, UnicodeDecodeError):
        os.close(fd)
        return "cannot be read"
    return Shard(name, fd, 10 + length, rows, meta.get("crc32"))


def read_rows(shard: Shard, rows: np.ndarray, out: np.ndarray, where: np.ndarray) -> bool:
    """Copy rows of a shard into out[where]; False when the shard is damaged (a short read,
    or checksums that differ).

    A shard read whole is checked against its checksums; read with one call, straight
    into `out`, when its rows go to consecutive places there, as a run's own shards do.
    Part of a shard is read row by row and not checked.
    """
    record = int(np.prod(out.shape[1:]))
    order = np.argsort(rows, kind="stable")
    rows, where = rows[order], where[order]
    whole = shard.crc32 is not None and len(np.unique(rows)) == shard.rows > 0
    first = int(where[0]) if len(where) else 0
    if whole and len(rows) == shard.rows and (where == first + np.arange(len(where))).all():
        view = out[first : first + shard.rows]
        if os.preadv(shard.fd, [view], shard.offset) != view.nbytes:
            return False
        return checksums(view) == shard.crc32
    checksum, previous = Checksum(), -1
    for row, position in zip(rows.tolist(), where.tolist(), strict=True):
        if os.preadv(shard.fd, [out[position]], shard.offset + row * record) != record:
            return False
        if whole and row != previous:  # in file order, each row once
            checksum.update(out[position])
        previous = row
    return not whole or checksum.result() == shard.crc32
