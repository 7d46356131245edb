"""Writing to the decoded-image cache: decode a piece at a time into new shards, compact
the shards whose files changed, remove what dead writers left.

Every function here runs with the cache folder's exclusive lock held (engine.cache).
A write that fails (space, quota, permissions) is said in one line and turns the disk
cache off for the run; the images decoded go on into memory when the caller holds them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from engine.shards import Decoded, Shard, ShardWriter, open_shard, read_rows

DECODE_CHUNK = 2048  # images decoded (and held) at a time before they are written

# indices of the keys to decode (ascending, at most DECODE_CHUNK) -> their images; it may
# also have a `pieces(indices)` method that decodes them all in one pass (see _pieces)
Decode = Callable[[list[int]], Decoded]


def file_key(path: str) -> str:
    """An image file's cache key: absolute path, size and modification time (ns)."""
    if not path.startswith("/") or "/." in path or "//" in path:
        path = os.path.abspath(path)  # (most paths are absolute and normal already)
    try:
        stat = os.stat(path)
    except OSError:
        return f"{path}|-1|-1"
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def stale(key: str) -> bool:
    """A file's entry whose file has since changed or gone (other keys never go stale)."""
    return key.startswith("/") and file_key(key.rsplit("|", 2)[0]) != key


def decode_and_store(
    folder: Path,
    shape: tuple[int, int, int],
    keys: list[str],
    missing: list[int],
    decode: Decode,
    out: Decoded | None,
) -> bool:
    """Decode the keys at positions `missing`, DECODE_CHUNK at a time, each piece written
    to new shards (and copied into out when given).

    Returns:
        False when a write failed: the disk cache is then off for the run; out is still
        filled, while without out the decoding stops there.
    """
    started = time.time_ns()
    writer = ShardWriter(folder, shape)
    storing = True
    try:
        remove_leftovers(folder)
        for chunk, new in _pieces(decode, missing):
            if out is not None:
                out.images[chunk], out.labels[chunk] = new.images, new.labels
                out.failures.update({chunk[i]: why for i, why in new.failures.items()})
            if storing:
                storing = _append(writer, [keys[i] for i in chunk], new, folder)
            if not storing and out is None:
                return False
        if storing:
            writer.close()
            compact(folder, shape, since=started)
    except OSError as err:
        storing = cannot_write(folder, err)
        if out is None:
            return False
    finally:
        writer.abort()
    if storing:
        print(
            f"cache: wrote {len(missing)} images ({writer.written / 1e6:.1f} MB) to "
            f"{folder}; the cache holds {size_bytes(folder.parent) / 1e6:.1f} MB"
        )
    return storing


def _pieces(decode: Decode, missing: list[int]) -> Iterator[tuple[list[int], Decoded]]:
    """The images of the keys at `missing`, a piece at a time: (their positions, Decoded).
    In one pass where the decode function offers one (a `pieces` method, as
    engine.images.FileDecoder), else DECODE_CHUNK at a time."""
    pieces = getattr(decode, "pieces", None)
    if pieces is not None:
        yield from pieces(missing)
        return
    for start in range(0, len(missing), DECODE_CHUNK):
        chunk = missing[start : start + DECODE_CHUNK]
        yield chunk, decode(chunk)


def _append(writer: ShardWriter, keys: list[str], new: Decoded, folder: Path) -> bool:
    """Add a decoded piece (keys in its order) to the writer; False (said) if it failed."""
    ok = np.flatnonzero(new.ok())
    failed = {keys[i]: why for i, why in new.failures.items()}
    try:
        if len(ok) == len(keys):  # no failures: no copy of the images
            writer.add(keys, new.images, new.labels, failed)
        else:
            writer.add([keys[i] for i in ok], new.images[ok], new.labels[ok], failed)
    except OSError as err:
        writer.abort()
        return cannot_write(folder, err)
    return True


def cannot_write(folder: Path, err: OSError) -> bool:
    """Say that the disk cache is off for this run (space, quota, permissions); False."""
    print(
        f"cache: cannot write to {folder} ({err.strerror or err}); this run goes on without "
        "the disk cache"
    )
    return False


def compact(folder: Path, shape: tuple[int, int, int], since: int) -> None:
    """Rewrite the shards that mostly hold files since changed or gone, without those.

    Shards written at or after `since` (time.time_ns()) are fresh and left alone. A
    shard that is damaged is removed without being copied.
    """
    for meta_path in sorted(folder.glob("*.json")):
        if int(meta_path.stem.split("-")[0]) >= since:
            continue
        meta = json.loads(meta_path.read_text())
        live = [row for row, key in enumerate(meta["keys"]) if not stale(key)]
        if meta["keys"]:
            worth_it = len(live) * 2 < len(meta["keys"])
        else:  # a shard of failures only
            worth_it = any(map(stale, meta["failed"]))
        if not worth_it:
            continue
        failed = {k: v for k, v in meta["failed"].items() if not stale(k)}
        images = np.empty((len(live), *shape), np.uint8)
        shard = open_shard(folder, meta_path.stem, meta, shape) if live else None
        if isinstance(shard, Shard):
            whole = read_rows(shard, np.array(live), images, np.arange(len(live)))
            shard.close()
            live = live if whole else []
        elif live:  # damaged: nothing of it is copied
            live = []
        if live or failed:
            writer = ShardWriter(folder, shape)
            labels = np.asarray(meta["labels"], np.int64)[live]
            writer.add([meta["keys"][row] for row in live], images[: len(live)], labels, failed)
            writer.close()
        meta_path.unlink()  # the .json first: without it the shard is not there
        meta_path.with_suffix(".npy").unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> int:
    """Remove what writers that died left: temporary files, and `.npy` files whose
    `.json` was never written. Called with the exclusive lock held, so no writer is at
    work. Returns the bytes freed."""
    freed = 0
    for leftover in folder.glob(".tmp-*"):
        freed += leftover.stat().st_size
        leftover.unlink(missing_ok=True)
    for array in folder.glob("*.npy"):
        if not array.with_suffix(".json").exists():
            freed += array.stat().st_size
            array.unlink(missing_ok=True)
    return freed


def size_bytes(root: Path) -> int:
    """Bytes the cache's shards take, over all sizes and channel counts."""
    return sum(p.stat().st_size for p in root.glob("*/*") if not p.name.startswith("."))
