"""The data check's image fingerprints, kept in the decoded-image cache beside the images.

A run's fingerprints (engine.perceptual.RECORD, one per image) are one file in the
cache folder of its image size and channels, named by a digest of the run's cache keys
in order (`fingerprints-<digest>.bin`): the same keys as the decoded images (a file's
path, size and modification time; an array's digest and index), so the same data gives
the same file and a changed file gives a new one. A warm run reads it and fingerprints
nothing. The files are small (RECORD.itemsize bytes an image), written whole under a
temporary name and renamed, and go with `make cache-clean`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from engine import cache as image_cache
from engine.cache_folder import make_folder
from engine.perceptual import CHUNK, RECORD, fingerprints
from engine.shards import write_atomic

FINGERPRINT_VERSION = 2  # bump when engine.perceptual's fingerprints change


def fingerprint_file(keys: list[str], cache_dir: str, shape: tuple[int, int, int]) -> Path:
    """Where the fingerprints of `keys` (in order) are kept."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode() + b"\n")
    root = cache_dir or image_cache.default_cache_dir()
    folder = image_cache.ImageCache(root, shape[0], shape[2]).folder  # the images' own
    return folder / f"fingerprints-v{FINGERPRINT_VERSION}-{digest.hexdigest()[:24]}.bin"


def cached_fingerprints(
    keys: list[str],
    images_at: Callable[[np.ndarray], np.ndarray],
    cache: bool,
    cache_dir: str,
    shape: tuple[int, int, int],
) -> tuple[np.ndarray, int]:
    """The fingerprints of the images of keys: read from the cache, or computed CHUNK
    images at a time (so a streamed data set is never held whole) and stored.

    Args:
        images_at: positions in keys -> those images (uint8, any size).
        cache: whether the disk cache is on (--cache).

    Returns:
        (records, how many were computed now).
    """
    path = fingerprint_file(keys, cache_dir, shape) if cache else None
    if path is not None and path.exists() and path.stat().st_size == len(keys) * RECORD.itemsize:
        return np.fromfile(path, RECORD), 0
    records = np.empty(len(keys), RECORD)
    for start in range(0, len(keys), CHUNK):
        at = np.arange(start, min(start + CHUNK, len(keys)))
        records[at] = fingerprints(images_at(at))
    if path is not None:
        with contextlib.suppress(OSError):  # an unwritable cache: computed again next time
            make_folder(path.parent)
            write_atomic(path, records.tobytes())
    return records, len(keys)
