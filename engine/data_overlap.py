"""validate's check that the images it scores were not the model's training images.

A score on images the model trained on says little. The training run recorded its data
(engine.tracking.log_dataset: an MLflow dataset input whose digest covers every file,
label and split) and its config (the run's params). When the evaluated data has the
recorded digest, it is the training data as the run split it, and its own table says
which rows were trained on; otherwise the fork's load_data rebuilds the training run's
data from the run's params (the same seed and splits) to learn which files those were.
Either way the evaluated files are matched by path. Sources without a file table
(arrays, tfds) are not checked; nothing here stops validate.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlflow

from engine.config import field_type, parse_bool

ARTIFACT = "training_overlap.json"  # in the validation run
METRIC = "images_in_training_split"
_CONVERT = {"int": int, "float": float, "str": str, "bool": parse_bool}


@dataclass
class Overlap:
    """Evaluated files that the model's training run trained (or chose its epoch) on."""

    training_run_id: str
    evaluated: int  # evaluated images with a file path
    in_training: list[str] = field(default_factory=list)  # in the model's training split
    in_validation: list[str] = field(default_factory=list)  # its best epoch was chosen on these
    note: str = ""  # why the check is partial or could not run

    def warning(self) -> str:
        """One paragraph for the console; empty when nothing overlaps."""
        if not self.in_training and not self.in_validation:
            return ""
        names = ", ".join(os.path.basename(p) for p in (self.in_training or self.in_validation)[:5])
        return (
            f"warning: {len(self.in_training)} of the {self.evaluated} evaluated images were in "
            f"the model's training split and {len(self.in_validation)} in its validation split "
            f"(run {self.training_run_id}; e.g. {names}): these scores are optimistic. Evaluate "
            "with the training run's seed, val_split and test_split (see the run's params), "
            "or on data the model never saw."
        )


def evaluated_files(lineage: dict, split: str) -> list[str] | None:
    """The files of the evaluated images (validate's split of the data), None without a table."""
    table, rows = lineage.get("table"), lineage.get("split_rows") or {}
    if table is None:
        return None
    if split == "all":
        return list(table["path"])
    chosen = rows.get("test" if split == "test" else "val")
    return None if chosen is None else [table["path"][row] for row in chosen]


def training_config(run: mlflow.entities.Run, data_cfg: Any) -> Any:
    """data_cfg with the values the training run logged for its fields (seed, splits, ...)."""
    params = run.data.params
    values = {
        f.name: _CONVERT[field_type(f)](params[f.name])
        for f in dataclasses.fields(data_cfg)
        if f.name in params
    }
    return dataclasses.replace(data_cfg, **values)


def training_overlap(
    run_id: str, data_cfg: Any, load_data: Callable[[Any], tuple], lineage: dict, split: str
) -> Overlap | None:
    """Which evaluated files the training run `run_id` trained or validated on.

    Args:
        run_id: the model version's training run.
        data_cfg: the fork's Config validate loaded the data with.
        load_data: the fork's load_data, to rebuild the training run's data when needed.
        lineage: the evaluated data's DataInfo.lineage.
        split: validate's split (test, validation or all).

    Returns:
        The overlap, None when the evaluated data has no file table.
    """
    evaluated = evaluated_files(lineage, split)
    if evaluated is None or not run_id:
        return None
    found = Overlap(run_id, len(evaluated))
    try:
        run = mlflow.MlflowClient().get_run(run_id)
        digests = {item.dataset.digest for item in run.inputs.dataset_inputs}
        if lineage.get("digest") in digests:  # the training data itself, split as it was
            trained = lineage["table"]
        else:
            print("checking the evaluated images against the model's training data ...")
            rebuilt = load_data(training_config(run, data_cfg))[2].lineage
            trained = rebuilt.get("table")
            if trained is None:
                found.note = "the training run's data has no file table: not checked"
                return found
            if digests and rebuilt.get("digest") not in digests:
                found.note = "the training data changed since the run; matched by path"
    except Exception as err:  # a report beside the scores: validate goes on without it
        found.note = f"could not rebuild the training run's data ({err})"
        return found
    splits = dict(zip(map(os.path.realpath, trained["path"]), trained["split"], strict=True))
    for path in evaluated:
        split_of = splits.get(os.path.realpath(path))
        if split_of in ("train", "val"):
            (found.in_training if split_of == "train" else found.in_validation).append(path)
    return found


def say_and_record(overlap: Overlap | None, validation_run_id: str) -> None:
    """Print the overlap's warning (or note) and log it into validate's run."""
    if overlap is None:
        return
    if overlap.warning():
        print(overlap.warning())
    if overlap.note:
        print(f"note: training-data overlap: {overlap.note}")
    client = mlflow.MlflowClient()
    client.log_dict(validation_run_id, dataclasses.asdict(overlap), ARTIFACT)
    client.log_metric(validation_run_id, METRIC, len(overlap.in_training))
