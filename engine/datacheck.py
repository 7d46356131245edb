"""The data check every run makes on its decoded images, before the split (--data-check).

It finds exact duplicates (the same decoded pixels), near duplicates (re-encoded,
resized, brightened, slightly cropped copies: engine.perceptual's pHashes and aligned
thumbnails, searched by multi-index hashing, not all pairs), label conflicts (one
image, or its near copy, filed under two classes), the class balance, and nearly
uniform images (blank, black, white: pixel std under UNIFORM_STD; these are listed, and
left out of the duplicate groups, where a set of blank frames would make one giant
group). Fingerprints are kept
in the decoded-image cache (engine.cache_hashes), so a warm run computes none.

Duplicate clusters, joined with a table's --group-column, are the groups the split
keeps whole (engine.splits), so a copy never lands in train while its original is in
test. A split the source gives wins; duplicates across it are then reported, and
`--data-check strict` refuses to train while they, or label conflicts, remain.

What it leaves is a DataCheck in DataInfo.data_check: the data_check.json report, the
one summary line, the metrics and the pairs for the contact sheet
(engine.datacheck_log logs them). A fork's own load_data that builds its own tf.data
has none: the check is then skipped with a note.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.cache_hashes import cached_fingerprints
from engine.config import RunConfig
from engine.perceptual import components, near_pairs
from engine.splits import split_indices, split_names

UNIFORM_STD = 2.0  # gray-level std (0..255) under which an image counts as nearly uniform
ARTIFACT = "data_check.json"  # the report, in the run's artifact root
LISTED = 1000  # entries of each list kept in data_check.json (the counts are all there)
ImagesAt = Callable[[np.ndarray], np.ndarray]


@dataclass
class DataCheck:
    """The check's findings, for the console, the run's artifacts and --data-check strict."""

    report: dict  # data_check.json
    summary: str  # the one line printed before training
    problems: list[str]  # what strict refuses: label conflicts, duplicates across splits
    metrics: dict[str, float]
    # the worst findings' images and captions, for the contact sheet
    sheet: list[list[tuple[np.ndarray, str]]] = field(default_factory=list, repr=False)


def fingerprint(keys: list[str], images_at: ImagesAt, cfg: RunConfig) -> np.ndarray:
    """The fingerprints of the images of keys, from the cache where it has them."""
    shape = (cfg.image_size, cfg.image_size, cfg.channels)
    records, computed = cached_fingerprints(keys, images_at, cfg.cache, cfg.cache_dir, shape)
    print(f"data check: {computed} images fingerprinted, {len(keys) - computed} from the cache")
    return records


def _star(ids: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Pairs that join every run of equal ids (each to the next), among `keep` positions."""
    at = np.arange(len(ids)) if keep is None else keep
    order = at[np.argsort(ids[at], kind="stable")]
    same = ids[order[1:]] == ids[order[:-1]]
    return np.stack([order[:-1][same], order[1:][same]], 1)


def clusters(records: np.ndarray) -> tuple[np.ndarray, dict]:
    """A cluster id per image: exact and near duplicates share one; uniform images are
    each their own. And how far the near-duplicate search went (see near_pairs' budget):
    {"candidate_pairs", "verified", "complete"}."""
    live = np.flatnonzero(records["std"] >= UNIFORM_STD)
    near, search = near_pairs(*(records[name][live] for name in ("phash", "crops", "thumb")))
    pairs = np.concatenate([_star(records["exact"], live), live[near]]).astype(np.int64)
    search["complete"] = search["verified"] == search["candidate_pairs"]
    return components(len(records), pairs), search


def group_ids(
    cluster: np.ndarray | None, paths: list[str], column: list | None
) -> np.ndarray | None:
    """The groups the split keeps whole: duplicate clusters joined with a group column's
    values; each named by its first member's column value, or its first member's path."""
    if cluster is None and column is None:
        return None
    count = len(paths)
    pairs = [np.empty((0, 2), np.int64)]
    if cluster is not None:
        pairs.append(_star(cluster))
    if column is not None:
        pairs.append(_star(np.unique(np.asarray(column, str), return_inverse=True)[1]))
    joined = components(count, np.concatenate(pairs))
    first = np.full(joined.max() + 1, -1)
    first[joined[::-1]] = np.arange(count)[::-1]  # each group's first member
    names = np.asarray(column, str) if column is not None else np.asarray(paths, str)
    return names[first[joined]]


def split_checked(
    keys: list[str],
    paths: list[str],
    labels: np.ndarray,
    class_names: list[str],
    cfg: RunConfig,
    images_at: ImagesAt,
    assigned: list[str] | None = None,
    column: list | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], DataCheck | None]:
    """The data check, then the split that keeps its duplicate groups (and a group
    column's groups) whole.

    Args:
        keys: each image's cache key; paths: each image's path (or a name for an array's).
        images_at: positions in keys -> those decoded images.
        assigned: the split the source gives each image, which wins (see split_indices).
        column: each image's group id from --group-column, or None.

    Returns:
        ((train, val, test) index arrays, the check; None when --data-check is off).
    """
    if cfg.data_check == "off":
        return split_indices(labels, cfg, assigned, group_ids(None, paths, column)), None
    records = fingerprint(keys, images_at, cfg)
    cluster, search = clusters(records)
    parts = split_indices(labels, cfg, assigned, group_ids(cluster, paths, column))
    loose = parts
    if len(np.unique(cluster)) < len(cluster):  # the split duplicates would have had
        loose = split_indices(labels, cfg, assigned, group_ids(None, paths, column), notes=False)
    splits = np.asarray(split_names(len(labels), parts), str)
    would_be = np.asarray(split_names(len(labels), loose), str)
    found = (records, cluster, paths, labels, class_names, splits, would_be, images_at, search)
    return parts, report(*found)


def report(
    records: np.ndarray,
    cluster: np.ndarray,
    paths: list[str],
    labels: np.ndarray,
    class_names: list[str],
    splits: np.ndarray,
    would_be: np.ndarray,
    images_at: ImagesAt,
    search: dict | None = None,
) -> DataCheck:
    """The findings, given each image's split and the split it would have had without
    its duplicates kept together, and how far the near-duplicate search went (clusters)."""
    labels = np.asarray(labels)

    def member(i: int) -> dict:
        return {"path": paths[i], "class": class_names[labels[i]], "split": str(splits[i])}

    groups, conflicts, across, worst = _groups(records, cluster, labels, splits, would_be, member)
    counts = np.bincount(labels, minlength=len(class_names))
    ratio = float(counts.max() / max(counts.min(), 1))
    uniform = np.flatnonzero(records["std"] < UNIFORM_STD)
    apart_groups = [g for g in across if not g["kept_together"]]
    problems = [_describe(c["members"]) for c in conflicts]
    problems += [_describe(g["members"]) for g in apart_groups]
    search = search or {"candidate_pairs": 0, "verified": 0, "complete": True}
    summary = _summary(len(across), bool(apart_groups), len(conflicts), ratio, search)
    report_dict = {
        "groups_across_splits": across[:LISTED],
        "label_conflicts": conflicts[:LISTED],
        "near_duplicate_groups": groups[:LISTED],
        "likely_label_errors": [],
        "near_duplicate_search": search,
        "class_balance": {
            "counts": dict(zip(class_names, counts.tolist(), strict=True)),
            "imbalance_ratio": round(ratio, 3),
        },
        "uniform_images": [
            {**member(i), "std": round(float(records["std"][i]), 2)} for i in uniform[:LISTED]
        ],
        "counts": {
            "images": len(paths),
            "near_duplicate_groups": len(groups),
            "groups_across_splits": len(across),
            "label_conflicts": len(conflicts),
            "uniform_images": len(uniform),
        },
    }
    sheet = []
    for kind, row in worst[:6] + [("nearly uniform", [i]) for i in uniform[:2].tolist()]:
        pixels = images_at(np.asarray(row, np.int64))
        sheet.append([(pixels[j], f"{kind}\n{_caption(member(i))}") for j, i in enumerate(row)])
    metrics = {
        "data_duplicate_groups": float(len(groups)),
        "data_label_conflicts": float(len(conflicts)),
        "data_imbalance_ratio": ratio,
    }
    return DataCheck(report_dict, summary, problems, metrics, sheet)


def _groups(records, cluster, labels, splits, would_be, member) -> tuple[list, list, list, list]:
    """(duplicate groups, label conflicts, groups across splits: report entries; and
    (what, pair) for the contact sheet, worst first: conflicts, groups apart, the rest)."""
    sizes = np.unique(cluster, return_counts=True)[1]
    members = np.split(np.argsort(cluster, kind="stable"), np.cumsum(sizes)[:-1])
    groups, conflicts, across = [], [], []
    rows: tuple[list, list, list] = ([], [], [])
    for group in (m for m in members if len(m) > 1):
        entry = {
            "kind": "exact" if len(np.unique(records["exact"][group])) == 1 else "near",
            "members": [member(i) for i in group.tolist()],
        }
        groups.append(entry)
        classes = sorted({m["class"] for m in entry["members"]})
        apart = len({s for s in splits[group] if s}) > 1
        if len(classes) > 1:
            conflicts.append({"classes": classes, "members": entry["members"]})
            rows[0].append(("label conflict", _pair(group, labels)))
        elif apart:
            rows[1].append(("duplicates across splits", group[:2].tolist()))
        else:
            rows[2].append((f"{entry['kind']} duplicates", group[:2].tolist()))
        if apart or len({s for s in would_be[group] if s}) > 1:
            across.append({"kept_together": not apart, "members": entry["members"]})
    return groups, conflicts, across, [*rows[0], *rows[1], *rows[2]]


def _summary(across: int, apart: bool, conflicts: int, ratio: float, search: dict) -> str:
    """The one line printed before training; it says so when the near-duplicate search
    was cut short by its budget (near_pairs: look-alike images left pairs unchecked)."""
    together = "across the source's splits" if apart else "kept together"
    cut_short = ""
    if not search["complete"]:
        checked = f"{search['verified']:,} of {search['candidate_pairs']:,} candidate pairs"
        cut_short = f"; near-duplicate search incomplete (look-alike images: {checked} checked)"
    return (
        f"data check: {across} near-duplicate groups across splits ({together}), "
        f"{conflicts} label conflicts, imbalance {ratio:.1f}:1{cut_short}; see {ARTIFACT}"
    )


def _pair(group: np.ndarray, labels: np.ndarray) -> list[int]:
    """Two members of a group, of two classes where it has two."""
    first = group[0]
    other = next((i for i in group[1:] if labels[i] != labels[first]), group[1])
    return [int(first), int(other)]


def _describe(members: list[dict]) -> str:
    return " = ".join(f"{m['path']} ({m['class']}, {m['split'] or 'unused'})" for m in members[:4])


def _caption(entry: dict) -> str:
    path = entry["path"]
    short = "/".join(path.split("/")[-2:])
    return f"{short}\n{entry['class']}, {entry['split'] or 'unused'}"
