"""Train / val / test splits: seeded, stratified by class, and groups kept whole.

`split_indices` draws the split every source uses. Examples of one group (a patient or
slide id from a table's --group-column, a cluster of near-duplicate images from the data
check) never straddle two splits: whole groups are dealt to the splits, class by class
(a group counts for its most common class), so the split stays as stratified as the
groups allow. Without groups, or when every group is one example, the split is the
plain stratified one it always was. A split a source gives (a table's split column)
wins over both.
"""

from __future__ import annotations

import numpy as np

from engine.config import RunConfig, UserError

SPLITS = ("train", "val", "test")
# names a table's split column may use for each split
SPLIT_ALIASES = {
    alias: split
    for split, aliases in {
        "train": ("train", "training"),
        "val": ("val", "valid", "validation", "dev"),
        "test": ("test", "testing"),
    }.items()
    for alias in aliases
}


def _cap(count: int, limit: int) -> int:
    return min(count, limit) if limit else count


def _stratified(
    indices: np.ndarray, labels: np.ndarray, rng: np.random.Generator, val: float, test: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """indices -> (train, val, test), each class split in the same proportions."""
    parts: tuple[list, list, list] = ([], [], [])
    for k in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == k])
        n_val, n_test = _split_sizes(len(members), val, test)
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[0].append(members[n_test + n_val :])
    train, val_idx, test_idx = (np.concatenate(p).astype(np.int64) for p in parts)
    if not len(val_idx) and len(train) > 1:  # tiny data: one validation image at least
        largest = np.bincount(labels[train]).argmax()
        pick = np.flatnonzero(labels[train] == largest)[0]
        val_idx, train = train[pick : pick + 1], np.delete(train, pick)
    return train, val_idx, test_idx


def _split_sizes(n: int, val: float, test: float) -> tuple[int, int]:
    """(val, test) images of a class of n: every class keeps a training image."""
    n_test = min(round(n * test), max(n - 2, 0))
    return min(round(n * val), n - n_test - 1), n_test


def _grouped(
    indices: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    rng: np.random.Generator,
    val: float,
    test: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """indices -> (train, val, test) dealing whole groups, class by class."""
    ids, inverse = np.unique(groups[indices], return_inverse=True)
    sizes = np.bincount(inverse)
    classes = int(labels.max()) + 1
    per_class = np.bincount(inverse * classes + labels[indices], minlength=len(ids) * classes)
    group_class = per_class.reshape(len(ids), classes).argmax(1)
    part = np.zeros(len(ids), np.int64)  # 0 train, 1 val, 2 test, per group
    for k in np.unique(group_class):
        members = rng.permutation(np.flatnonzero(group_class == k))
        n_val, n_test = _split_sizes(int(sizes[members].sum()), val, test)
        start = np.cumsum(sizes[members]) - sizes[members]  # images dealt before each group
        part[members] = np.where(start < n_test, 2, np.where(start < n_test + n_val, 1, 0))
        if not (part[members] == 0).any():  # every class keeps a training group
            part[members[-1]] = 0
    if not (part == 1).any() and val > 0:  # tiny data: the smallest spare training group
        training = np.flatnonzero(part == 0)
        per_class_groups = np.bincount(group_class[training], minlength=classes)
        spare = [g for g in training if per_class_groups[group_class[g]] > 1]
        if spare:
            part[min(spare, key=lambda g: sizes[g])] = 1
    example_part = part[inverse]
    for name, at, fraction in (("val", 1, val), ("test", 2, test)):
        wanted = sum(min(round(c * fraction), c - 1) for c in np.bincount(labels[indices]) if c)
        if wanted and not (example_part == at).any():
            raise UserError(empty_split_message(name, ids, sizes, len(indices)))
    return tuple(indices[example_part == at] for at in (0, 1, 2))  # type: ignore[return-value]


def empty_split_message(split: str, ids: np.ndarray, sizes: np.ndarray, count: int) -> str:
    """The one paragraph that says grouping left a split empty, naming the largest groups."""
    largest = np.argsort(-sizes, kind="stable")[:5]
    named = ", ".join(f"'{ids[g]}' ({sizes[g]} images)" for g in largest)
    return (
        f"keeping groups whole leaves the {split} split empty: the {count} images fall into "
        f"{len(ids)} groups, the largest {named}. Add data with more groups, split larger "
        "groups (--group-column), or set that split's fraction to 0 (--test-split 0)."
    )


def report_large_groups(groups: np.ndarray, cfg: RunConfig) -> None:
    """Say when a group is larger than the val or test split's share of the data."""
    ids, sizes = np.unique(groups, return_counts=True)
    fractions = (("val", cfg.val_split), ("test", cfg.test_split))
    shares = [(name, round(len(groups) * f)) for name, f in fractions if f > 0]
    if not shares:
        return
    name, share = min(shares, key=lambda pair: pair[1])
    large = np.flatnonzero(sizes > share)
    if len(large):
        top = large[np.argsort(-sizes[large], kind="stable")][:3]
        named = ", ".join(f"'{ids[g]}' ({sizes[g]} images)" for g in top)
        print(
            f"note: {len(large)} group(s) are larger than the {name} split's share of {share} "
            f"images, e.g. {named}; each stays whole, so the split sizes move off "
            f"val_split / test_split"
        )


def split_indices(
    labels, cfg: RunConfig, assigned: list[str] | None = None, groups=None, notes: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A seeded split into (train, val, test) index arrays, stratified by class.

    The same labels, groups and seed always give the same split. Each split is
    shuffled; train and val are capped by cfg.training_samples / cfg.validation_samples.

    Args:
        labels: the class index of every example.
        cfg: val_split, test_split, seed and the caps.
        assigned: the split the source already gives each example (train, val or test;
            see SPLIT_ALIASES). Examples it marks test or val stay there; when it marks
            none val, val is split from its train examples by cfg.val_split.
        groups: a group id per example (None: every example its own group). Examples of
            one group land in one split, except where `assigned` puts them.
        notes: print the note on groups larger than a split's share (False for a second
            split of the same data, whose notes were said).

    Raises:
        UserError: keeping groups whole leaves val or test empty.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(cfg.seed)
    everything = np.arange(len(labels))
    if groups is not None:
        groups = np.asarray(groups)
        if len(np.unique(groups)) == len(groups):  # all singletons: the plain split
            groups = None

    def draw(indices: np.ndarray, val: float, test: float):
        if groups is None:
            return _stratified(indices, labels, rng, val, test)
        return _grouped(indices, labels, groups, rng, val, test)

    if assigned is None:
        if groups is not None and notes:
            report_large_groups(groups, cfg)
        train, val, test = draw(everything, cfg.val_split, cfg.test_split)
    else:
        marks = np.asarray(assigned)
        train, val, test = (everything[marks == name] for name in SPLITS)
        if not len(val):
            train, val, _ = draw(train, cfg.val_split, 0.0)
    train, val, test = (rng.permutation(part) for part in (train, val, test))
    return (
        train[: _cap(len(train), cfg.training_samples)],
        val[: _cap(len(val), cfg.validation_samples)],
        test,
    )


def class_counts(labels, splits: tuple[np.ndarray, ...], num_classes: int) -> dict[str, list[int]]:
    """Images per class in each split, as DataInfo.class_counts."""
    labels = np.asarray(labels, dtype=np.int64)
    return {
        name: np.bincount(labels[idx], minlength=num_classes).tolist()
        for name, idx in zip(SPLITS, splits, strict=True)
    }


def split_names(count: int, splits: tuple[np.ndarray, ...]) -> list[str]:
    """The split of each of `count` examples ("" for one left out by a cap)."""
    names = np.full(count, "", dtype=object)
    for name, idx in zip(SPLITS, splits, strict=True):
        names[idx] = name
    return names.tolist()
