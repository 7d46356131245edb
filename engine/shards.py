"""The decoded-image cache's shards on disk: written a piece at a time, checked, read by row.

A shard is `<name>.npy`, a uint8 (rows, size, size, channels) array, and `<name>.json`:
its keys (one per row), labels, failures, and since issue 25 its `rows` and the
`crc32` of its pixels. Both files are written under temporary
names and renamed into place, the `.json` last, so a shard exists only once whole.

ShardWriter appends decoded images as they come, so decoding never holds more than
one piece of the data: the `.npy` header is written first for SHARD_IMAGES rows and
rewritten, padded to the same length, for the rows the shard got when it closes.

open_shard checks a shard before it is read: its header, and its size against its
rows (a truncated shard is found by one fstat). The checksum is checked where the
whole shard is read anyway (read_rows, the in-memory pipeline); rows read one by one
(the stream) are checked by size only.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.cache_folder import FILE_MODE

SHARD_IMAGES = 8192  # images per shard at most: a changed file rewrites no more than one
READ_BLOCK = 16 << 20  # bytes read at a time when a whole shard is read and checked
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
        self._meta = {"keys": [], "labels": [], "failed": {}, "crc32": 0}

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
            self._meta["crc32"] = zlib.crc32(block.data, self._meta["crc32"])
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
        meta = {**self._meta, "rows": rows}
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
    crc32: int | None  # None: written before shards had checksums

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
    or a checksum that differs).

    A shard read whole is read in blocks, in order, and its checksum checked on the
    way (about 1.4 GB/s on one core); straight into `out` when its rows go to
    consecutive places there, as a run's own shards do. Part of a shard is read row by
    row and not checksummed.
    """
    record = int(np.prod(out.shape[1:]))
    if len(rows) != shard.rows or shard.crc32 is None or not record:
        for row, position in zip(rows.tolist(), where.tolist(), strict=True):
            if os.preadv(shard.fd, [out[position]], shard.offset + row * record) != record:
                return False
        return True
    destination = np.empty(shard.rows, np.int64)
    destination[rows] = where
    first = int(destination[0])
    in_place = bool((destination == np.arange(first, first + shard.rows)).all())
    per_block = max(READ_BLOCK // record, 1)
    buffer = None if in_place else np.empty((min(per_block, shard.rows), *out.shape[1:]), np.uint8)
    crc = 0
    for start in range(0, shard.rows, per_block):
        count = min(per_block, shard.rows - start)
        block = out[first + start : first + start + count] if in_place else buffer[:count]
        if os.preadv(shard.fd, [block], shard.offset + start * record) != block.nbytes:
            return False
        crc = zlib.crc32(block.data, crc)
        if not in_place:
            out[destination[start : start + count]] = block
    return crc == shard.crc32
