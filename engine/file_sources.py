"""The data sources of image files: a folder per class (imagedir), a table of paths and
labels (dataframe), and the offline synthetic demo (made as an imagedir folder).

Each ends in engine.images.files_pipeline, which decodes every file once (or reads it
from the shared cache) and returns (train_ds, val_ds, info).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from engine.common import IMAGE_EXTENSIONS, list_images
from engine.config import RunConfig, UserError
from engine.images import SPLIT_ALIASES, DataInfo, files_pipeline, label_index

Pipelines = tuple[tf.data.Dataset, tf.data.Dataset, DataInfo]
DEMO_CLASSES = ("parasitized", "uninfected")


def require_path(path_text: str, what: str) -> Path:
    """The path the user gave, which must exist; UserError saying what to give otherwise."""
    if not path_text:
        raise UserError(f"--data-dir is required for this data source: give {what}")
    path = Path(path_text).expanduser()
    if not path.exists():
        raise UserError(f"data path {path} does not exist: give {what} with --data-dir")
    return path


# ----------------------------------------------------------------------------
# imagedir: one sub-folder per class
# ----------------------------------------------------------------------------


def load_imagedir(folder: str, cfg: RunConfig) -> Pipelines:
    """One sub-folder per class, images of any size, PNG/JPEG/BMP/GIF/WebP, gray or RGB."""
    root = require_path(folder, "a folder with one sub-folder of images per class")
    if not root.is_dir():
        raise UserError(f"{root} is a file; imagedir needs a folder of class sub-folders")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = " (it holds images directly: move them into one sub-folder per class)"
        raise UserError(f"{root} has no class sub-folders{hint if loose else ''}")
    paths, labels, empty = [], [], []
    for index, class_dir in enumerate(class_dirs):
        listing = list_images(class_dir, cfg.follow_links_out)
        if listing.skipped_links:
            print(f"note: {listing.describe_skipped(class_dir)}")
        files = listing.files
        if not files:
            empty.append(class_dir.name)
        paths += files
        labels += [index] * len(files)
    if empty:
        raise UserError(
            f"class folder(s) {', '.join(empty)} in {root} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)"
        )
    return files_pipeline(paths, labels, [d.name for d in class_dirs], cfg, "imagedir")


# ----------------------------------------------------------------------------
# dataframe: a CSV or JSON table of paths and labels
# ----------------------------------------------------------------------------


def read_table(table: Path) -> list[dict]:
    """The rows of a .csv or .json table; JSON as records or as {column: [values]}."""
    if table.suffix.lower() == ".csv":
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
    elif table.suffix.lower() == ".json":
        rows = json.loads(table.read_text())
        if isinstance(rows, dict):
            try:
                columns = zip(*rows.values(), strict=True)
                rows = [dict(zip(rows, values, strict=True)) for values in columns]
            except ValueError as err:
                raise UserError(f"{table}: its columns have different lengths") from err
    else:
        raise UserError(f"{table}: tables of image paths must be .csv or .json")
    if not rows:
        raise UserError(f"{table} has no rows")
    return rows


def table_paths(table: Path, values: list) -> list[str]:
    """A table's image paths made absolute (relative ones from its folder); all must exist."""
    folder = os.path.abspath(table.parent)  # abspath, not resolve(): no syscall per row
    paths = [os.path.normpath(os.path.join(folder, str(value))) for value in values]
    absent = [p for p in paths if not os.path.exists(p)]
    if absent:
        raise UserError(
            f"{len(absent)} image path(s) in {table} do not exist, e.g. {absent[0]}. "
            "Fix the paths (relative ones are read from the table's folder)."
        )
    return paths


def table_column(table: Path, rows: list[dict], column: str, flag: str) -> list:
    """One column's values; UserError naming the table's columns and the flag when absent."""
    if column not in rows[0]:
        raise UserError(
            f"{table} has no column '{column}'; its columns are {', '.join(rows[0])}. "
            f"Name the column with {flag}."
        )
    return [row[column] for row in rows]


def load_dataframe(
    table_text: str, cfg: RunConfig, path_column: str, label_column: str, split_column: str = ""
):
    """A CSV or JSON table (e.g. a saved query result) of image paths and labels.

    Relative paths are taken relative to the table's folder. JSON is a list of
    records, [{"path": "...", "label": "..."}, ...], or {column: [values]}. When the
    table has a column named split_column (train, val/validation or test per row),
    its split is used instead of drawing one. With cfg.group_column, rows of one group
    (e.g. one patient) land in one split.
    """
    table = require_path(table_text, "a .csv or .json table of image paths and labels")
    rows = read_table(table)
    raw_paths = table_column(table, rows, path_column, "--path-column")
    raw_labels = table_column(table, rows, label_column, "--label-column")
    require_filled(
        table, raw_labels, label_column, "label", "Fill in their labels or remove those rows."
    )
    groups = table_groups(table, rows, cfg.group_column) if cfg.group_column else None
    paths = table_paths(table, raw_paths)
    labels, class_names = label_index(raw_labels)
    splits = None
    if split_column and split_column in rows[0]:
        splits = table_splits(table, [row[split_column] for row in rows], split_column)
    return files_pipeline(paths, labels, class_names, cfg, "dataframe", splits, groups)


def table_groups(table: Path, rows: list[dict], column: str) -> list[str]:
    """The --group-column's values; UserError when the column is absent or a cell empty."""
    values = table_column(table, rows, column, "--group-column")
    fix = "Give every row a group id (e.g. the patient or slide), or run without --group-column."
    require_filled(table, values, column, "group", fix)
    return [str(value).strip() for value in values]


def require_filled(table: Path, values: list, column: str, what: str, fix: str) -> None:
    """UserError naming the rows (by line) whose cell in `column` is empty."""
    empty = [i + 2 for i, value in enumerate(values) if str(value or "").strip() == ""]
    if empty:
        raise UserError(
            f"{table}: {len(empty)} row(s) have no {what} in column '{column}' (e.g. line "
            f"{empty[0]}). {fix}"
        )


def table_splits(table: Path, values: list, column: str) -> list[str]:
    """A split column's values as train / val / test; UserError on any other value."""
    splits = [SPLIT_ALIASES.get(str(v).strip().lower(), "") for v in values]
    bad = sorted({str(v) for v, split in zip(values, splits, strict=True) if not split})
    if bad:
        raise UserError(
            f"{table}: column '{column}' holds {', '.join(map(repr, bad[:5]))}; each row's "
            f"split must be one of {', '.join(sorted(SPLIT_ALIASES))}. Fix those rows, or "
            "rename the column to let the run draw its own split."
        )
    return splits


# ----------------------------------------------------------------------------
# demo: synthetic malaria-like cells, made offline
# ----------------------------------------------------------------------------


def make_demo_data(directory: str | Path, samples: int, image_size: int = 64, seed: int = 0):
    """Write a synthetic, malaria-like imagedir dataset: one folder per class of PNGs.

    Each image is a round pink cell on a pale background; `parasitized` cells hold
    one to three small dark dots, `uninfected` ones a few faint pale blotches. The
    same arguments always give the same images.

    Args:
        directory: where the class folders go (created).
        samples: total number of images, split evenly between the two classes.
        image_size: width and height in pixels.
        seed: random seed.
    """
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    for name in DEMO_CLASSES:
        (Path(directory) / name).mkdir(parents=True, exist_ok=True)
    for i in range(samples):
        parasitized = i % 2 == 0
        image = np.empty((image_size, image_size, 3), np.float32)
        image[:] = rng.uniform(225, 245, 3)
        radius = rng.uniform(0.3, 0.42) * image_size
        center = image_size / 2 + rng.uniform(-0.08, 0.08, 2) * image_size
        squash = rng.uniform(0.85, 1.15)
        cell = ((rows - center[0]) * squash) ** 2 + ((cols - center[1]) / squash) ** 2 < radius**2
        image[cell] = rng.uniform([200, 120, 150], [230, 160, 190])
        n_spots = rng.integers(1, 4)
        for _ in range(n_spots):
            angle, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.6) * radius
            spot_r = rng.uniform(0.04, 0.07) * image_size
            y, x = center[0] + dist * np.sin(angle), center[1] + dist * np.cos(angle)
            spot = (rows - y) ** 2 + (cols - x) ** 2 < spot_r**2
            colour = [90, 30, 110] if parasitized else [235, 190, 210]
            image[spot & cell] = colour
        image += rng.normal(0, 6, image.shape)
        pixels = np.clip(image, 0, 255).astype(np.uint8)
        label = DEMO_CLASSES[0] if parasitized else DEMO_CLASSES[1]
        Image.fromarray(pixels).save(Path(directory) / label / f"cell_{i:05d}.png")


def load_demo(folder: str | Path, samples: int, cfg: RunConfig) -> Pipelines:
    """The offline synthetic dataset: made on first use (see make_demo_data), then imagedir."""
    if samples < 4:
        raise UserError(f"demo_samples must be at least 4, got {samples}")
    directory = Path(folder)
    stamp = directory / "demo.json"
    recipe = {"samples": samples, "image_size": 64, "seed": 0, "version": 1}
    if not stamp.exists() or json.loads(stamp.read_text()) != recipe:
        print(f"making {samples} synthetic demo images in {directory} ...")
        for class_name in DEMO_CLASSES:
            for old in (directory / class_name).glob("*.png"):
                old.unlink()
        make_demo_data(directory, samples, recipe["image_size"], recipe["seed"])
        stamp.write_text(json.dumps(recipe))
    train_ds, val_ds, info = load_imagedir(str(directory), cfg)
    return (
        train_ds,
        val_ds,
        dataclasses.replace(info, source="demo", lineage={**info.lineage, "name": "demo"}),
    )
