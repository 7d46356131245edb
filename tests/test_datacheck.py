"""The data check (issue 21): planted exact and near duplicates found and named, groups
kept whole by the split, a table's group column, --data-check strict, the warm cache,
and what a tiny real run records.

Engine code only, on data made here: smooth random images (an 8x8 noise field scaled
up), so distinct images share no fingerprint, and copies of some of them re-encoded as
JPEG, resized, brightened or renamed under another class; and cropped copies (2 px and
5% of the side, on every side, one or two) among the demo's look-alike cells, which must
be found while thousands of distinct cells stay apart."""

from __future__ import annotations

import csv
import dataclasses
import io
import json

import mlflow
import numpy as np
import pytest
from PIL import Image

import train
from engine import perceptual
from engine import sources as src
from engine.config import UserError
from engine.datacheck import clusters
from engine.datacheck_log import before_run
from engine.file_sources import make_demo_data
from engine.images import DataInfo, arrays_pipeline, split_indices
from engine.perceptual import fingerprints
from tests.conftest import engine_config, tiny_config, train_and_log


def smooth_image(rng: np.random.Generator, size: int = 48) -> Image.Image:
    field = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(field).resize((size, size), Image.BILINEAR)


def jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return Image.open(io.BytesIO(buffer.getvalue()))


def brighter(image: Image.Image) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image).astype(int) + 20, 0, 255).astype(np.uint8))


@pytest.fixture
def planted(tmp_path):
    """30 distinct images a class in cats/ and dogs/, and four planted copies:
    cats/0 as JPEG in dogs/ (a label conflict), cats/1 resized and cats/2 brightened in
    cats/, dogs/3 copied byte for byte into cats/ (an exact conflict)."""
    rng = np.random.default_rng(7)
    root = tmp_path / "pets"
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(30):
            smooth_image(rng).save(root / name / f"{i}.png")
    original = {i: Image.open(root / "cats" / f"{i}.png").convert("RGB") for i in range(3)}
    jpeg(original[0]).save(root / "dogs" / "copy0.jpg")
    original[1].resize((40, 40)).save(root / "cats" / "copy1.png")
    brighter(original[2]).save(root / "cats" / "copy2.png")
    (root / "cats" / "copy3.png").write_bytes((root / "dogs" / "3.png").read_bytes())
    return root


def planted_pairs(root) -> list[set[str]]:
    return [
        {str(root / "cats" / "0.png"), str(root / "dogs" / "copy0.jpg")},
        {str(root / "cats" / "1.png"), str(root / "cats" / "copy1.png")},
        {str(root / "cats" / "2.png"), str(root / "cats" / "copy2.png")},
        {str(root / "dogs" / "3.png"), str(root / "cats" / "copy3.png")},
    ]


def paths(entry: dict) -> frozenset[str]:
    return frozenset(m["path"] for m in entry["members"])


def test_planted_duplicates_are_found_named_and_kept_in_one_split(planted):
    _, _, info = src.load_imagedir(str(planted), engine_config(test_split=0.2))
    report = info.data_check.report
    groups = [{m["path"] for m in g["members"]} for g in report["near_duplicate_groups"]]
    assert sorted(map(sorted, groups)) == sorted(map(sorted, planted_pairs(planted)))
    kinds = {paths(g): g["kind"] for g in report["near_duplicate_groups"]}
    assert kinds[frozenset(planted_pairs(planted)[3])] == "exact"
    conflicts = {paths(c): c["classes"] for c in report["label_conflicts"]}
    assert conflicts == {
        frozenset(planted_pairs(planted)[0]): ["cats", "dogs"],
        frozenset(planted_pairs(planted)[3]): ["cats", "dogs"],
    }
    for group in report["near_duplicate_groups"]:  # kept together: one split each
        assert len({m["split"] for m in group["members"]}) == 1
    split_of = dict(zip(info.lineage["table"]["path"], info.lineage["table"]["split"], strict=True))
    for pair in planted_pairs(planted):
        assert len({split_of[p] for p in pair}) == 1
    assert info.data_check.metrics["data_label_conflicts"] == 2
    assert info.data_check.metrics["data_duplicate_groups"] == 4
    assert report["likely_label_errors"] == []
    assert set(report["class_balance"]["counts"]) == {"cats", "dogs"}
    line = info.data_check.summary
    assert line.startswith("data check: ") and "2 label conflicts, imbalance " in line
    assert line.endswith("; see data_check.json") and "incomplete" not in line
    assert report["near_duplicate_search"]["complete"]


def test_a_warm_second_run_decodes_and_fingerprints_nothing(planted, tmp_path, capsys):
    cfg = engine_config(cache_dir=str(tmp_path / "cache"))
    first = src.load_imagedir(str(planted), cfg)[2]
    assert "0 from the cache" in capsys.readouterr().out
    second = src.load_imagedir(str(planted), cfg)[2]
    out = capsys.readouterr().out
    assert "(0 decoded)" in out and "data check: 0 images fingerprinted" in out
    assert second.data_check.report == first.data_check.report


def test_the_streamed_pipeline_checks_shard_by_shard_alike(planted, tmp_path):
    cfg = engine_config(cache_dir=str(tmp_path / "cache"), memory_budget="0")
    _, _, info = src.load_imagedir(str(planted), cfg)
    assert info.pipeline_params["data_pipeline"] == "stream"
    assert info.data_check.metrics["data_duplicate_groups"] == 4


def test_arrays_are_checked_by_their_digest(tmp_path):
    rng = np.random.default_rng(3)
    images = np.stack([np.asarray(smooth_image(rng, 32)) for _ in range(40)])
    images[5] = images[30]  # an exact copy, filed under the other class
    labels = np.arange(40) % 2
    cfg = engine_config(cache_dir=str(tmp_path / "cache"))
    _, _, info = arrays_pipeline(images, labels, ["a", "b"], cfg, "arrays")
    [conflict] = info.data_check.report["label_conflicts"]
    assert {m["path"] for m in conflict["members"]} == {"arrays[5]", "arrays[30]"}


def test_data_check_off_runs_no_check(planted, capsys):
    _, _, info = src.load_imagedir(str(planted), engine_config(data_check="off"))
    assert info.data_check is None
    assert "data check" not in capsys.readouterr().out


def write_table(folder, rows: list[dict]) -> str:
    with open(folder / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(folder / "table.csv")


@pytest.fixture
def patients(tmp_path):
    """60 images of 12 patients (5 each), two classes."""
    rng = np.random.default_rng(11)
    rows = []
    for i in range(60):
        smooth_image(rng, 24).save(tmp_path / f"{i}.png")
        label = "sick" if i % 2 else "well"
        rows.append({"path": f"{i}.png", "label": label, "patient": f"p{i % 12}"})
    return tmp_path, rows


def test_a_group_column_keeps_each_patient_in_one_split(patients):
    folder, rows = patients
    table = write_table(folder, rows)
    cfg = engine_config(group_column="patient", val_split=0.25, test_split=0.25)
    _, _, info = src.load_dataframe(table, cfg, "path", "label")
    patient = {str(folder / r["path"]): r["patient"] for r in rows}
    splits: dict[str, set[str]] = {}
    table_rows = zip(info.lineage["table"]["path"], info.lineage["table"]["split"], strict=True)
    for path, split in table_rows:
        splits.setdefault(patient[path], set()).add(split)
    assert all(len(s) == 1 for s in splits.values()), splits
    assert info.val_count and info.test_count and info.train_count


def test_group_column_errors_come_before_any_work(patients, capsys):
    folder, rows = patients
    table = write_table(folder, rows)
    with pytest.raises(UserError, match="no column 'slide'.*--group-column"):
        src.load_dataframe(table, engine_config(group_column="slide"), "path", "label")
    rows[4]["patient"] = " "
    table = write_table(folder, rows)
    with pytest.raises(UserError, match="1 row\\(s\\) have no group in column 'patient'"):
        src.load_dataframe(table, engine_config(group_column="patient"), "path", "label")
    assert "decoded" not in capsys.readouterr().out


def test_grouping_that_empties_a_split_names_the_largest_groups():
    labels = [0] * 10 + [1] * 10
    groups = ["ward-a"] * 10 + ["ward-b"] * 10
    with pytest.raises(UserError, match="leaves the val split empty.*'ward-a' \\(10 images\\)"):
        split_indices(labels, engine_config(val_split=0.2, test_split=0.0), None, groups)


def test_groups_are_seeded_stratified_and_reproducible():
    labels = np.repeat([0, 1], 100)
    groups = np.arange(200) // 4  # 50 groups of 4, each of one class
    cfg = engine_config(val_split=0.2, test_split=0.2)
    first = split_indices(labels, cfg, None, groups)
    again = split_indices(labels, cfg, None, groups)
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    for part in first:
        assert abs(np.bincount(labels[part], minlength=2)[0] - len(part) / 2) <= 4
    owner = {g: {s for s, part in enumerate(first) if g in set(groups[part])} for g in range(50)}
    assert all(len(splits) == 1 for splits in owner.values())


def test_a_bad_data_check_value_is_refused_before_any_work():
    with pytest.raises(UserError, match="data_check must be warn, strict or off, got 'loud'"):
        engine_config(data_check="loud").validate()


def test_strict_refuses_naming_the_files_before_any_run(planted, tracking_store):
    cfg = tiny_config(data_source="imagedir", data_dir=str(planted), data_check="strict")
    with pytest.raises(UserError, match="strict refuses to train") as refused:
        train_and_log(cfg)
    assert str(planted / "dogs" / "copy0.jpg") in str(refused.value)
    assert str(planted / "cats" / "0.png") in str(refused.value)
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_a_fork_own_pipelines_skip_the_check_with_a_note(capsys):
    info = DataInfo(image_shape=(8, 8, 3), class_names=["a", "b"], train_count=2, val_count=1)
    before_run(dataclasses.replace(info, source="mine"), engine_config())
    assert "data check: skipped for data source 'mine'" in capsys.readouterr().out


def test_a_group_larger_than_a_split_share_is_reported(capsys):
    labels = np.repeat([0, 1], 50)
    groups = np.concatenate([np.full(30, "big"), np.arange(70).astype(str)])
    split_indices(labels, engine_config(val_split=0.2, test_split=0.1), None, groups)
    out = capsys.readouterr().out
    assert "1 group(s) are larger than the test split's share of 10 images" in out
    assert "'big' (30 images)" in out


def test_a_tiny_run_records_the_check(planted, tracking_store, capsys):
    cfg = tiny_config(data_source="imagedir", data_dir=str(planted), image_size=24)
    result = train_and_log(cfg)
    assert "data check: " in capsys.readouterr().out
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.metrics["data_label_conflicts"] == 2
    assert run.data.metrics["data_duplicate_groups"] == 4
    assert "data_imbalance_ratio" in run.data.metrics
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"data_check.json", "data_check.png"} <= names
    report_path = client.download_artifacts(result.run_id, "data_check.json")
    with open(report_path) as f:
        report = json.load(f)
    keys = {"groups_across_splits", "label_conflicts", "near_duplicate_groups"}
    assert keys | {"likely_label_errors", "class_balance", "uniform_images"} <= set(report)


def test_tune_trials_share_one_split_and_read_the_check_from_the_cache(planted, capsys):
    """Each `make tune` trial is a run_training run that loads the data again: with the
    cache warm its check fingerprints nothing, and every trial trains on the same split."""
    tables = []
    for learning_rate, dropout in ((1e-3, 0.0), (3e-3, 0.4)):
        cfg = tiny_config(
            data_source="imagedir",
            data_dir=str(planted),
            learning_rate=learning_rate,
            dropout=dropout,
        )
        tables.append(train.load_data(cfg)[2].lineage["table"])
    assert "data check: 0 images fingerprinted" in capsys.readouterr().out
    assert tables[0] == tables[1]


def test_a_table_split_wins_and_its_crossing_duplicates_are_reported_and_refused(planted):
    rows = [
        {
            "path": str(p),
            "label": p.parent.name,
            "split": "test" if p.name == "copy1.png" else "train",
        }
        for p in sorted(planted.glob("*/*.*"))
    ]
    table = write_table(planted, rows)
    _, _, info = src.load_dataframe(table, engine_config(), "path", "label", "split")
    check = info.data_check
    [apart] = [g for g in check.report["groups_across_splits"] if not g["kept_together"]]
    assert {(m["path"].split("/")[-1], m["split"]) for m in apart["members"]} == {
        ("1.png", "train"),
        ("copy1.png", "test"),
    }
    assert "(across the source's splits)" in check.summary
    with pytest.raises(UserError, match="copy1.png \\(cats, test\\)"):
        before_run(info, engine_config(data_check="strict"))


def cropped(image: np.ndarray, left: int, top: int, right: int, bottom: int) -> np.ndarray:
    """The image less these pixels at each side, resized back to its size."""
    size = image.shape[0]
    window = Image.fromarray(image[top : size - bottom, left : size - right])
    return np.asarray(window.resize((size, size), Image.BILINEAR))


def demo_cells(folder, count: int) -> np.ndarray:
    """`count` of the demo's look-alike 64 px cells (make_demo_data), as one array."""
    make_demo_data(folder, count, 64)
    files = sorted(folder.glob("*/*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


COPIES = {
    "jpeg": lambda a: np.asarray(jpeg(Image.fromarray(a))),
    "resized": lambda a: np.asarray(Image.fromarray(a).resize((48, 48)).resize((64, 64))),
    "brighter": lambda a: np.asarray(brighter(Image.fromarray(a))),
    "2 px a side": lambda a: cropped(a, 2, 2, 2, 2),
    "2 px left": lambda a: cropped(a, 2, 0, 0, 0),
    "5% a side": lambda a: cropped(a, 3, 3, 3, 3),
    "5% right": lambda a: cropped(a, 0, 0, 3, 0),
    "5% top and left": lambda a: cropped(a, 3, 3, 0, 0),
    "5% a side, jpeg": lambda a: np.asarray(jpeg(Image.fromarray(cropped(a, 3, 3, 3, 3)))),
}


def test_cropped_copies_are_found_beside_reencoded_ones_and_look_alikes_kept_apart(tmp_path):
    cells = demo_cells(tmp_path, 300)
    copies = np.stack([copy(cells[10 * k]) for k, copy in enumerate(COPIES.values())])
    records = fingerprints(np.concatenate([cells, copies]))
    cluster, search = clusters(records)
    assert search["complete"]
    for k, kind in enumerate(COPIES):
        assert cluster[len(cells) + k] == cluster[10 * k], kind
    sizes = np.bincount(cluster)
    assert sorted(sizes[sizes > 1]) == [2] * len(COPIES)  # the planted pairs, nothing else


def test_look_alikes_past_the_budget_verify_the_closest_pairs_and_say_so(tmp_path, monkeypatch):
    """Only 20 candidate pairs verified (of ~600 among 300 look-alike cells): the exact
    copy and the JPEG copy (identical pHashes) are still found, and the report and the
    summary line say the search was cut short."""
    monkeypatch.setattr(perceptual, "PAIR_BUDGET", 20)
    monkeypatch.setattr(perceptual, "PAIR_BUDGET_PER_IMAGE", 0)
    root = tmp_path / "cells"
    make_demo_data(root, 300, 64)
    files = sorted(root.glob("*/*.png"))
    (root / "uninfected" / "exact.png").write_bytes(files[3].read_bytes())
    jpeg(Image.open(files[5]).convert("RGB")).save(root / "parasitized" / "copy.jpg")
    check = src.load_imagedir(str(root), engine_config(test_split=0.2))[2].data_check
    groups = {paths(g) for g in check.report["near_duplicate_groups"]}
    assert frozenset({str(files[3]), str(root / "uninfected" / "exact.png")}) in groups
    assert frozenset({str(files[5]), str(root / "parasitized" / "copy.jpg")}) in groups
    search = check.report["near_duplicate_search"]
    assert search["verified"] == 20 < search["candidate_pairs"] and not search["complete"]
    clause = (
        f"; near-duplicate search incomplete (look-alike images: 20 of "
        f"{search['candidate_pairs']:,} candidate pairs checked); see data_check.json"
    )
    assert check.summary.endswith(clause)
    assert (
        check.summary.startswith("data check: ") and " label conflicts, imbalance " in check.summary
    )


@pytest.mark.slow
def test_no_false_groups_among_thousands_of_look_alike_demo_cells(tmp_path):
    cells = demo_cells(tmp_path, 2000)
    assert len(np.unique(clusters(fingerprints(cells))[0])) == len(cells)


def test_no_false_groups_among_sklearn_digits():
    """1,797 handwritten digits (8x8, shipped with scikit-learn, none duplicated) scaled
    up to 32 px: smooth and alike, what an aligned correlation alone would join."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = (datasets.load_digits().images * 255 / 16).astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(d).resize((32, 32), Image.BILINEAR)) for d in digits]
    )
    assert len(np.unique(clusters(fingerprints(images))[0])) == len(images)
