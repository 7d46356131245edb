"""Image fingerprints in NumPy, for the data check (engine.datacheck): exact and perceptual
hashes of already-decoded images, and near-duplicate search that is not all-pairs.

Why our own code and not imagehash: imagehash hashes one PIL image at a time (a PIL
conversion, a resize and a scipy DCT per image, in Python: a loop of 100k calls before
any search, and it has no search at all; not installed here, and requirements stay as
they are). The images here are decoded already, as one uint8 array, so the same pHash is
a few matrix products over a chunk of thousands at once: gray -> box-resampled to 32x32
(one matmul each side) -> the 8x8 lowest DCT frequencies (two more) -> one bit per
frequency, set when above the median of the 63 AC ones. A brightness shift moves only
the DC term, which is left out; JPEG re-encoding, resizing and slight crops move the low
frequencies little. pHash alone joins look-alike but distinct images (the demo's round
cells differ in a few bits), so a candidate pair must also have 16x16 gray thumbnails
(kept beside the hash) that correlate at MIN_CORRELATION. Measured on 2,000 demo cells
at 64 px: re-encoded (JPEG q75), resized and brightened copies reach 0.998 or more,
distinct cells at most 0.989, a copy cropped by one pixel a side 0.987 to 1 (most of
them count, not all); by two pixels a side, copies and look-alikes can no longer be told
apart this way.

Search: multi-index hashing. Split the 64 pHash bits into BANDS bands of 16; two hashes
within MAX_DISTANCE <= 2 * BANDS - 1 bits of each other agree exactly, or but for one bit,
in at least one band (pigeonhole). So each band is sorted once and every hash looks up
its band value and the 16 one-bit neighbours of it (searchsorted); only those candidates
are compared in full. Identical hashes are collapsed first, so a set of blank images
costs one entry, not n squared pairs. The whole check on 100,000 images (the
fingerprints, this search, the groups and the report; tests/bench_datacheck.py) took
11 s at 32 px and 26 s at 64 px on 2 cores, 5 s warm (fingerprints from the cache).
"""

from __future__ import annotations

import hashlib
from functools import cache

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

HASH_SIZE = 32  # images are box-resampled to this before the DCT
MAX_DISTANCE = 7  # bits of 64 two near duplicates' pHashes may differ in
BANDS = 4
CHUNK = 2048  # images hashed at a time (a few MB of float32)
MIN_CORRELATION = 0.99  # of two candidates' THUMB x THUMB gray thumbnails, to count as near
THUMB = 16
RECORD = np.dtype(
    [("exact", "<u8"), ("phash", "<u8"), ("std", "<f4"), ("mean", "<f4"), ("thumb", "u1", THUMB**2)]
)


@cache
def _box(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix that averages the input pixels each output pixel covers."""
    edges = np.linspace(0, size_in, size_out + 1)
    centers = np.arange(size_in) + 0.5
    matrix = (centers[None, :] >= edges[:-1, None]) & (centers[None, :] < edges[1:, None])
    matrix = matrix.astype(np.float32)
    empty = matrix.sum(1) == 0  # upsampling: take the nearest input pixel
    matrix[empty, np.minimum((edges[:-1][empty]).astype(int), size_in - 1)] = 1
    return matrix / matrix.sum(1, keepdims=True)


@cache
def _dct8() -> np.ndarray:
    """The 8 lowest rows of the orthonormal DCT-II matrix of size HASH_SIZE."""
    n = np.arange(HASH_SIZE)
    rows = np.cos(np.pi * (2 * n[None, :] + 1) * np.arange(8)[:, None] / (2 * HASH_SIZE))
    return rows.astype(np.float32)


def _pack(bits: np.ndarray) -> np.ndarray:
    """(n, 64) booleans -> (n,) uint64, the first bit the highest."""
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).ravel()


def fingerprints(images: np.ndarray) -> np.ndarray:
    """Exact hash, pHash, pixel std and mean, and a gray thumbnail of each image.

    Args:
        images: (n, H, W[, C]) pixel values 0..255 (uint8 usually), any H and W.

    Returns:
        (n,) records of RECORD.
    """
    out = np.empty(len(images), RECORD)
    for start in range(0, len(images), CHUNK):
        out[start : start + CHUNK] = _chunk(np.asarray(images[start : start + CHUNK]))
    return out


def _chunk(images: np.ndarray) -> np.ndarray:
    out = np.empty(len(images), RECORD)
    contiguous = np.ascontiguousarray(images)
    out["exact"] = [
        int.from_bytes(hashlib.blake2b(image, digest_size=8).digest(), "little")
        for image in contiguous
    ]
    gray = contiguous.astype(np.float32)
    if gray.ndim == 4:
        gray = gray.mean(axis=3)
    out["std"] = gray.std(axis=(1, 2))
    out["mean"] = gray.mean(axis=(1, 2))
    height, width = gray.shape[1:]
    small = _box(height, HASH_SIZE) @ gray @ _box(width, HASH_SIZE).T
    freq = (_dct8() @ small @ _dct8().T).reshape(len(images), 64)
    median = np.median(freq[:, 1:], axis=1, keepdims=True)
    out["phash"] = _pack(freq > median)
    thumb = _box(height, THUMB) @ gray @ _box(width, THUMB).T
    out["thumb"] = np.rint(thumb).reshape(len(images), -1).astype(np.uint8)
    return out


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    return np.bitwise_count(values)


def near_pairs(phash: np.ndarray, thumb: np.ndarray) -> np.ndarray:
    """Index pairs (i < j) whose pHashes differ in <= MAX_DISTANCE bits and whose
    thumbnails correlate at MIN_CORRELATION or more.

    Returns:
        (m, 2) int64.
    """
    unique, inverse = np.unique(phash, return_inverse=True)
    width = 64 // BANDS
    mask = np.uint64((1 << width) - 1)
    candidates = []
    for band in range(BANDS):
        values = (unique >> np.uint64(band * width)) & mask
        order = np.argsort(values, kind="stable")
        ordered = values[order]
        for flip in [0, *(1 << b for b in range(width))]:
            wanted = values ^ np.uint64(flip)
            lo = np.searchsorted(ordered, wanted, "left")
            hi = np.searchsorted(ordered, wanted, "right")
            counts = hi - lo
            query = np.repeat(np.arange(len(unique)), counts)
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            found = order[np.repeat(lo, counts) + offsets]
            keep = query < found
            query, found = query[keep], found[keep]
            near = popcount(unique[query] ^ unique[found]) <= MAX_DISTANCE
            candidates.append(query[near] * len(unique) + found[near])
    pairs = np.unique(np.concatenate(candidates))
    pairs = np.stack([pairs // len(unique), pairs % len(unique)], 1)
    # back from unique hashes to images: every image of one hash with every one of the other
    members = _members(inverse, len(unique))
    image_pairs = [_cross(members[a], members[b]) for a, b in pairs.tolist()]
    image_pairs += [_cross(m, m) for m in members if len(m) > 1]
    if not image_pairs:
        return np.empty((0, 2), np.int64)
    found = np.concatenate(image_pairs)
    return found[correlation(thumb[found[:, 0]], thumb[found[:, 1]]) >= MIN_CORRELATION]


def correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of a with the same row of b (brightness and
    contrast left out); 1 for two flat rows."""
    a = a.astype(np.float32) - a.mean(1, keepdims=True)
    b = b.astype(np.float32) - b.mean(1, keepdims=True)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, (a * b).sum(1) / np.maximum(norms, 1e-6), 1.0)


def _members(inverse: np.ndarray, count: int) -> list[np.ndarray]:
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse, minlength=count))[:-1])


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Every (i, j) of a x b with i < j; for many, a star from a's first (enough to join
    them into one group, and no n squared of identical blank images)."""
    if len(a) * len(b) > 64:
        a = a[:1]
    grid = np.stack(np.meshgrid(a, b, indexing="ij"), -1).reshape(-1, 2)
    grid = np.sort(grid, axis=1)
    return grid[grid[:, 0] < grid[:, 1]]


def components(count: int, pairs: np.ndarray) -> np.ndarray:
    """The connected component of each of `count` items linked by `pairs` (union-find)."""
    if not len(pairs):
        return np.arange(count)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(count, count))
    return connected_components(graph, directed=False)[1]
