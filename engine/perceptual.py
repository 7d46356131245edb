"""Image fingerprints in NumPy, for the data check (engine.datacheck): exact and perceptual
hashes of already-decoded images, and near-duplicate search that is not all-pairs.

Not imagehash: it hashes one PIL image at a time, in Python, and has no search. Here a
chunk of decoded images is hashed at once: gray, box-resampled to 32x32, the 8x8 lowest
DCT frequencies, a bit each above the median of the 63 AC ones. Crops move the pHash of
look-alikes much (2 px a side on 64 px demo cells: up to 14 bits), so each image also
keeps the pHashes of 9 crop VARIANTS (CROP of all, one or two adjacent sides).

Candidates are verified on 24 px RGB thumbnails (_same): one of the pair cropped (0-5%
a side, aligned by search) to fit the other, their gray correlation r must satisfy
1 - r <= MAX_MISFIT * fineness (what a half-pixel shift costs the finer image's own
correlation: a noisy cell's copy loses more than a smooth digit's look-alike), and
their colour shift (see aligned_scores) must be under COLOUR_SHIFT. Measured on 64 px
demo cells (40 each; found = hash and check):

    copy                     aligned r      misfit  colour  found (misfit, colour: max)
    JPEG q75; q50+darker     0.997-0.999    0.09    0.035   1.00
    resized to 48; +20       0.997-1        0.06    0.092   1.00
    1 px a side/one/two      0.992-0.999    0.14    0.025   0.93-0.97
    2 px a side/one/two      0.983-0.998    0.26    0.036   0.93-0.97
    3 px (5%) /+JPEG         0.980-0.998    0.29    0.035   0.88-1.00
    distinct, of candidates  up to 0.9936   >=0.25  >=0.11  0 groups

Distinct: 2,000 and 5,000 demo cells (24,824 and 151,043 candidate pairs) and sklearn's
1,797 digits at 32 and 64 px: no pair passes both (demo: misfit >= 0.253 where the
colour passes, colour >= 0.109 where the misfit does; digits: misfit >= 0.282). The
margins are thin on the demo's near-identical cells; a few 2-3 px crops are missed.

Search: multi-index hashing. Split the 64 pHash bits into BANDS bands of 16; two hashes
within MAX_DISTANCE <= 2 * BANDS - 1 bits agree exactly, or but for one bit, in at least
one band (pigeonhole). Each band of the table (every image's pHash and its variants) is
sorted once; every pHash looks up its band value and its 16 one-bit neighbours
(searchsorted). Identical pHashes are collapsed first, so blank images cost one entry.
100,000 images (tests/bench_datacheck.py, 2 shared cores): 20 s at 32 px, 31 s at 64, 11-14 warm.
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
CROP = 0.045  # each side a crop variant's pHash leaves out, as a fraction of the side
# the sides (left, top, right, bottom) each crop variant leaves CROP of: all, one, two adjacent
VARIANTS = ((1, 1, 1, 1), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1),
            (1, 1, 0, 0), (0, 1, 1, 0), (0, 0, 1, 1), (1, 0, 0, 1))  # fmt: skip
THUMB = 24  # side of the RGB thumbnails candidates are verified on
SHIFTS = (0.0, 1 / 60, 2 / 60, 3 / 60)  # crops per side tried in alignment (of the side)
MAX_MISFIT = 0.25  # 1 - two near duplicates' aligned gray correlation, over their fineness
COLOUR_SHIFT = 0.1  # most colour shift (see aligned_scores) two near duplicates may have
PAIR_BUDGET, PAIR_BUDGET_PER_IMAGE = 25_000, 0.25  # pairs verified at most: ~30 s (near_pairs)
RECORD = np.dtype(
    [
        ("exact", "<u8"),
        ("phash", "<u8"),
        ("crops", "<u8", len(VARIANTS)),
        ("std", "<f4"),
        ("mean", "<f4"),
        ("thumb", "u1", (THUMB, THUMB, 3)),
    ]
)


@cache
def _box(size_in: int, size_out: int, lo: float = 0.0, hi: float = 0.0) -> np.ndarray:
    """(size_out, size_in) matrix that averages the input pixels each output pixel covers,
    of the window that leaves out the fractions lo and hi of the side at either end."""
    edges = np.linspace(lo * size_in, size_in * (1 - hi), size_out + 1)
    centers = np.arange(size_in) + 0.5
    matrix = (centers[None, :] >= edges[:-1, None]) & (centers[None, :] < edges[1:, None])
    matrix = matrix.astype(np.float32)
    empty = matrix.sum(1) == 0  # upsampling: take the nearest input pixel
    matrix[empty, np.minimum((edges[:-1][empty]).astype(int), size_in - 1)] = 1
    return matrix / matrix.sum(1, keepdims=True)


@cache
def _windows() -> np.ndarray:
    """(len(SHIFTS)**2, THUMB, THUMB) bilinear matrices, one per (lo, hi) crop of SHIFTS:
    each resamples a thumbnail's window that leaves out lo and hi of the side to THUMB."""
    position = (np.arange(THUMB) + 0.5) / THUMB
    matrices = []
    for lo in SHIFTS:
        for hi in SHIFTS:
            source = np.clip((lo + position * (1 - lo - hi)) * THUMB - 0.5, 0, THUMB - 1)
            left = np.floor(source).astype(int)
            right = np.minimum(left + 1, THUMB - 1)
            matrix = np.zeros((THUMB, THUMB), np.float32)
            np.add.at(matrix, (np.arange(THUMB), left), 1 - (source - left))
            np.add.at(matrix, (np.arange(THUMB), right), source - left)
            matrices.append(matrix)
    return np.stack(matrices)


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
    """Exact hash, pHash and its crop variants, pixel std and mean, and RGB thumbnail of each.

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
    colour = contiguous.astype(np.float32).reshape(*contiguous.shape[:3], -1)  # channels last
    gray = colour.mean(axis=3)
    out["std"] = gray.std(axis=(1, 2))
    out["mean"] = gray.mean(axis=(1, 2))
    height, width = gray.shape[1:]
    out["phash"] = _phash(_box(height, HASH_SIZE) @ gray @ _box(width, HASH_SIZE).T)
    # the variants' rows first: 4 row windows serve all of them, one product each
    rows = {(top, bottom): _box(height, HASH_SIZE, top * CROP, bottom * CROP) @ gray
            for top in (0, 1) for bottom in (0, 1)}  # fmt: skip
    for k, (left, top, right, bottom) in enumerate(VARIANTS):
        cols = _box(width, HASH_SIZE, left * CROP, right * CROP)
        out["crops"][:, k] = _phash(rows[top, bottom] @ cols.T)
    colour = colour[..., :3] if colour.shape[3] >= 3 else colour[..., :1].repeat(3, 3)
    thumb = _box(height, THUMB) @ colour.transpose(0, 3, 1, 2) @ _box(width, THUMB).T
    out["thumb"] = np.rint(thumb.transpose(0, 2, 3, 1)).astype(np.uint8)
    return out


def _phash(small: np.ndarray) -> np.ndarray:
    """(n, HASH_SIZE, HASH_SIZE) gray -> (n,) pHashes."""
    freq = (_dct8() @ small @ _dct8().T).reshape(len(small), 64)
    return _pack(freq > np.median(freq[:, 1:], axis=1, keepdims=True))


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64."""
    return np.bitwise_count(values)


def near_pairs(phash: np.ndarray, crops: np.ndarray, thumb: np.ndarray) -> tuple[np.ndarray, dict]:
    """Index pairs (i < j) whose pHashes differ in <= MAX_DISTANCE bits (or i's from one of
    j's crop variants', or j's from i's), and whose thumbnails tell them copies (_same).

    Why a budget: look-alikes give candidates in n squared (5,000 demo cells: 157,493, ~0.8 ms
    each); only PAIR_BUDGET + PAIR_BUDGET_PER_IMAGE * n, closest pHashes first, are verified.

    Returns:
        ((m, 2) int64, {"candidate_pairs": found, "verified": of them}).
    """
    unique, first, inverse = np.unique(phash, return_index=True, return_inverse=True)
    table = np.concatenate([unique[:, None], crops[first]], 1).ravel()
    owner = np.repeat(np.arange(len(unique)), 1 + crops.shape[1])
    pairs = _hash_pairs(unique, table, owner)
    # back from unique hashes to images: every image of one hash with every one of the other
    members = _members(inverse, len(unique))
    image_pairs = [_cross(members[a], members[b]) for a, b in pairs.tolist()]
    image_pairs += [_cross(m, m) for m in members if len(m) > 1]
    if not image_pairs:
        return np.empty((0, 2), np.int64), {"candidate_pairs": 0, "verified": 0}
    found = np.unique(np.concatenate(image_pairs), axis=0)  # one hash's own pairs came twice
    distance = popcount(phash[found[:, 0]] ^ phash[found[:, 1]])
    budget = max(int(PAIR_BUDGET + PAIR_BUDGET_PER_IMAGE * len(phash)), (distance == 0).sum())
    search = {"candidate_pairs": len(found), "verified": int(min(len(found), budget))}
    if len(found) > budget:
        found = found[np.sort(np.argsort(distance, kind="stable")[:budget])]
    parts = np.array_split(found, max(1, len(found) // 1024))  # bounds the alignment's memory
    same = np.concatenate([_same(thumb[i], thumb[j]) for i, j in map(np.transpose, parts)])
    return found[same], search


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether each thumbnail pair is a near duplicate: best aligned, alike in gray within
    MAX_MISFIT of their own fineness, and of one colour (COLOUR_SHIFT).

    Why relative to fineness: what a copy loses (JPEG, resampling, a crop aligned to a
    fraction of a pixel) is fine detail, so a noisy or sharp image's copy correlates
    less with it than a smooth one's does, while two smooth look-alikes (upscaled
    digits) correlate more than a noisy copy. Fineness is what a half-pixel shift costs
    an image's own correlation (1 minus it), the larger of the pair's."""
    aligned, colour = aligned_scores(a, b)
    fineness = np.maximum(_fineness(a), _fineness(b))
    return (1 - aligned <= MAX_MISFIT * fineness) & (colour <= COLOUR_SHIFT)


def _fineness(thumb: np.ndarray) -> np.ndarray:
    """1 minus the correlation of each gray thumbnail with itself moved half a pixel
    down and right (floored, so a flat image is no division by zero)."""
    gray = np.pad(thumb.mean(3, dtype=np.float32), ((0, 0), (0, 1), (0, 1)), "edge")
    moved = (gray[:, :-1, :-1] + gray[:, 1:, :-1] + gray[:, :-1, 1:] + gray[:, 1:, 1:]) / 4
    own = correlation(gray[:, :-1, :-1].reshape(len(gray), -1), moved.reshape(len(gray), -1))
    return np.maximum(1 - own, 1e-4)


def _hash_pairs(query: np.ndarray, table: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Pairs (a < b) of query positions where query[a] is within MAX_DISTANCE bits of a
    table hash of owner b, or query[b] of one of a's: multi-index hashing (see above)."""
    width = 64 // BANDS
    mask = np.uint64((1 << width) - 1)
    candidates = []
    for band in range(BANDS):
        shift = np.uint64(band * width)
        values = (table >> shift) & mask
        order = np.argsort(values, kind="stable")
        ordered = values[order]
        wanted_band = (query >> shift) & mask
        for flip in [0, *(1 << b for b in range(width))]:
            wanted = wanted_band ^ np.uint64(flip)
            lo = np.searchsorted(ordered, wanted, "left")
            counts = np.searchsorted(ordered, wanted, "right") - lo
            at = np.repeat(np.arange(len(query)), counts)
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            entry = order[np.repeat(lo, counts) + offsets]
            other = owner[entry]
            near = (at != other) & (popcount(query[at] ^ table[entry]) <= MAX_DISTANCE)
            candidates.append((np.minimum(at, other) * len(query) + np.maximum(at, other))[near])
    pairs = np.unique(np.concatenate(candidates))
    return np.stack([pairs // len(query), pairs % len(query)], 1)


def aligned_scores(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How alike each RGB thumbnail of a is to the same one of b, best aligned: one of
    them cropped by SHIFTS at each side and resampled, so a cropped copy aligns with its
    original.

    Why a search: a crop of a few pixels moves every edge of a thumbnail, and the plain
    correlation of such a copy falls below that of two look-alike distinct images. The
    crops of rows and of columns are chosen in turn on gray (rows, columns, rows again:
    3 x 16 tries, not 16 x 16), each way round. Why colour apart from shape: JPEG blurs
    colour locally, which lowers a copy's RGB correlation as much as a look-alike's;
    what it keeps is each channel's overall level and contrast, which a brightness or
    contrast change moves alike in all three and two distinct images do not.

    Args:
        a, b: (m, THUMB, THUMB, 3) uint8.

    Returns:
        (the gray Pearson correlation, the colour shift: each channel's offset and
        contrast left over when one gain and offset for all three map the aligned
        thumbnail onto the other, root mean square, over the other's std), each (m,).
    """
    a, b = a.astype(np.float32), b.astype(np.float32)
    best = np.full(len(a), -1.0, np.float32)
    shift = np.full(len(a), np.inf, np.float32)
    for x, y in ((a, b), (b, a)):
        rows, cols = _align(x.mean(3), y.mean(3))
        planes, windows = x.transpose(0, 3, 1, 2), _windows()
        moved = windows[rows][:, None] @ planes @ windows[cols].transpose(0, 2, 1)[:, None]
        moved = moved.reshape(len(a), 3, -1)
        target = y.transpose(0, 3, 1, 2).reshape(len(a), 3, -1)
        gray = correlation(moved.mean(1), target.mean(1))
        better = gray > best
        best = np.where(better, gray, best)
        shift = np.where(better, _colour_shift(moved, target), shift)
    return best, shift


def _colour_shift(moved: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(m, 3, pixels) twice -> (m,) the colour shift of aligned_scores."""
    flat_x = moved.reshape(len(moved), -1)
    flat_y = target.reshape(len(target), -1)
    x = flat_x - flat_x.mean(1, keepdims=True)
    y = flat_y - flat_y.mean(1, keepdims=True)
    gain = (x * y).sum(1) / np.maximum((x * x).sum(1), 1e-6)
    left = (y - gain[:, None] * x).reshape(moved.shape)
    offset = left.mean(2)
    channel = moved - moved.mean(2, keepdims=True)
    spread = np.maximum((channel * channel).sum(2), 1e-6)
    contrast = (left * channel).sum(2) / spread * channel.std(2)
    return np.sqrt((offset**2 + contrast**2).mean(1)) / np.maximum(flat_y.std(1), 1e-6)


def _align(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each gray thumbnail of x, the row and column windows (indices of _windows())
    that resample it closest to the same one of y."""
    windows = _windows()
    rows = np.zeros(len(x), int)
    cols = np.zeros(len(x), int)
    target = _normalized(y.reshape(len(y), 1, -1))
    for axis in (0, 1, 0):
        if axis == 0:
            tries = windows[None] @ (x @ windows[cols].transpose(0, 2, 1))[:, None]
        else:
            tries = (windows[rows] @ x)[:, None] @ windows.transpose(0, 2, 1)[None]
        best = (_normalized(tries.reshape(len(x), len(windows), -1)) * target).sum(2).argmax(1)
        rows, cols = (best, cols) if axis == 0 else (rows, best)
    return rows, cols


def _normalized(values: np.ndarray) -> np.ndarray:
    values = values - values.mean(-1, keepdims=True)
    return values / np.maximum(np.linalg.norm(values, axis=-1, keepdims=True), 1e-6)


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
