"""The verdict of `make reproduce`: two runs compared figure by figure.

Every metric both runs log is compared at every step (the per-epoch training and
validation figures, the best epoch's, the final validation and test scores), except
the figures that measure time or the machine (epoch_seconds, images_per_second,
system/...). The verdict:

    exact         every figure equal
    within <tol>  every difference at most the tolerance: absolute on accuracy-like
                  figures (accuracy, auc, precision, recall, f1: 0..1), relative on the
                  others (loss, best_epoch)
    no            a larger difference, or a figure the reproduction did not log

It goes into the new run (`reproduction.json`, `reproduction_curves.png`, tags) and
onto the source's model version: `reproduced`, `reproduced_by`, `reproduced_max_diff`,
which `validate --require-reproduced` reads (check_reproduced).
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from engine.config import UserError

# Figures that measure the machine, not the model: never compared.
UNCOMPARED = ("epoch_seconds", "images_per_second")
ACCURACY_LIKE = ("accuracy", "auc", "precision", "recall", "f1")
CURVES = (("loss", "val_loss"), ("accuracy", "val_accuracy"))


@dataclass
class Difference:
    """One figure at one step in both runs."""

    metric: str
    step: int
    source: float | None
    reproduction: float | None
    difference: float  # absolute (accuracy-like) or relative; inf when one is missing

    def describe(self) -> str:
        where = f"{self.metric} (step {self.step})"
        if self.reproduction is None:
            return f"{where}: {self.source} in the source run, not logged by the reproduction"
        kind = "absolute" if accuracy_like(self.metric) else "relative"
        return (
            f"{where}: {self.source:.6g} vs {self.reproduction:.6g} ({kind} {self.difference:.3g})"
        )


@dataclass
class Verdict:
    """What the comparison found, and where it was recorded."""

    verdict: str  # exact, within <tol>, no
    source_run: str
    reproduction_run: str
    tolerance: float
    figures: int
    largest: Difference | None
    over_tolerance: list[Difference] = field(default_factory=list)
    in_play: str = ""  # non-deterministic parts, when the source did not ask for determinism
    context: dict = field(default_factory=dict)

    def line(self) -> str:
        """The verdict in one line, as `make reproduce` prints it."""
        text = f"reproduced: {self.verdict} ({self.figures} figures of run {self.source_run}"
        text += f" against run {self.reproduction_run}"
        if self.largest is not None and self.largest.difference > 0:
            text += f"; largest difference {self.largest.describe()}"
        text += ")"
        if self.in_play:  # said on `exact` too: the next machine may not be as kind
            text += f"; the run was not --deterministic, in play: {self.in_play}"
        return text


def accuracy_like(metric: str) -> bool:
    """Whether a figure lies in 0..1 (compared by absolute difference)."""
    return "loss" not in metric and any(word in metric for word in ACCURACY_LIKE)


def compared(metric: str) -> bool:
    """Whether a figure says something about the model (not time, not the machine)."""
    return not metric.startswith("system/") and metric not in UNCOMPARED


def histories(client: mlflow.MlflowClient, run: Any) -> dict[str, dict[int, float]]:
    """Every compared metric of a run: name -> {step: value}."""
    return {
        name: {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        for name in run.data.metrics
        if compared(name)
    }


def difference(metric: str, a: float, b: float) -> float:
    """Absolute on accuracy-like figures, relative on the others."""
    if a == b:
        return 0.0
    if accuracy_like(metric):
        return abs(a - b)
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare(
    source: dict[str, dict[int, float]], reproduction: dict[str, dict[int, float]]
) -> list[Difference]:
    """Every figure of the source run against the reproduction's, largest difference first."""
    found = []
    for metric, steps in sorted(source.items()):
        for step, value in sorted(steps.items()):
            other = reproduction.get(metric, {}).get(step)
            gap = float("inf") if other is None else difference(metric, value, other)
            found.append(Difference(metric, step, value, other, gap))
    return sorted(found, key=lambda d: -d.difference)


def decide(differences: list[Difference], tolerance: float) -> str:
    """exact, within <tol> or no."""
    if all(d.difference == 0 for d in differences):
        return "exact"
    if all(d.difference <= tolerance for d in differences):
        return f"within {tolerance:g}"
    return "no"


def nondeterminism(source_run: Any) -> str:
    """What could make two runs of the source's settings differ, as its tags recorded."""
    if str(source_run.data.params.get("deterministic", "")).lower() == "true":
        return ""
    in_play = source_run.data.tags.get("determinism.in_play")
    return in_play or "unrecorded (the run predates determinism tags): GPU kernels, thread counts"


def environment_notes(source_run: Any, new_run: Any) -> list[str]:
    """Where the reproduction's image or packages differ from the source's."""
    notes = []
    for tag, what in (("code.image", "image"), ("env.lock_digest", "package lock")):
        before, after = source_run.data.tags.get(tag), new_run.data.tags.get(tag)
        if before != after:
            notes.append(f"{what}: {before or 'none'} then, {after or 'none'} now")
    before, after = dataset_digest(source_run), dataset_digest(new_run)
    if before != after:
        notes.append(
            f"dataset digest: {before or 'none'} then, {after or 'none'} now (it covers each "
            "file's path, size and time: the same images read through the checkout's "
            "folder, or demo images made again in a container, differ by those alone)"
        )
    return notes


def dataset_digest(run: Any) -> str:
    """The digest of a run's MLflow dataset ("" when it logged none)."""
    inputs = run.inputs.dataset_inputs if run.inputs else []
    return inputs[0].dataset.digest if inputs else ""


def plot_curves(source: dict, reproduction: dict, path: Path) -> None:
    """Learning curves side by side: the source run left, the reproduction right."""
    import matplotlib

    matplotlib.use("Agg")  # a file, never a window
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, title, series in (
        (axes[0], "source", source),
        (axes[1], "reproduction", reproduction),
    ):
        for pair in CURVES:
            for metric in pair:
                steps = sorted(series.get(metric, {}))
                axis.plot(steps, [series[metric][s] for s in steps], marker="o", label=metric)
        axis.set(title=f"{title} run", xlabel="epoch")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def judge(
    client: mlflow.MlflowClient, source: Any, new_run_id: str, tolerance: float, context: dict
) -> Verdict:
    """Compare the runs, record the verdict in the new run and on the source's version.

    Args:
        source: engine.reproduction.Source (its run, model name and version).
        new_run_id: the reproduction's run.
        tolerance: see the module's notes.
        context: what the reproduction checked and decided (data, notes, seconds).
    """
    new_run = client.get_run(new_run_id)
    before, after = histories(client, source.run), histories(client, new_run)
    differences = compare(before, after)
    context = {**context, "environment": environment_notes(source.run, new_run)}
    verdict = Verdict(
        verdict=decide(differences, tolerance),
        source_run=source.run_id,
        reproduction_run=new_run_id,
        tolerance=tolerance,
        figures=len(differences),
        largest=differences[0] if differences else None,
        over_tolerance=[d for d in differences if d.difference > tolerance],
        in_play=nondeterminism(source.run),
        context=context,
    )
    record = asdict(verdict)
    record["differences"] = [asdict(d) for d in differences]
    record["source_model"] = {"name": source.model_name, "version": source.model_version}
    client.log_dict(new_run_id, record, "reproduction.json")
    with tempfile.TemporaryDirectory() as tmp:
        plot_curves(before, after, Path(tmp) / "reproduction_curves.png")
        client.log_artifact(new_run_id, str(Path(tmp) / "reproduction_curves.png"))
    largest = verdict.largest.describe() if verdict.largest else "none"
    tags = {"reproduced": verdict.verdict, "reproduced_by": new_run_id}
    tags["reproduced_max_diff"] = largest if verdict.verdict != "exact" else "0"
    client.set_tag(new_run_id, "reproduction.verdict", verdict.verdict)
    if source.model_version:
        for key, value in tags.items():
            client.set_model_version_tag(source.model_name, source.model_version, key, value)
    return verdict


def reproduced_problem(tags: dict[str, str], name: str, version: str) -> str:
    """Why a version's `reproduced` tag forbids promoting it, or "" when it was reproduced
    exactly or within the tolerance."""
    verdict = tags.get("reproduced", "")
    if verdict == "exact" or verdict.startswith("within"):
        return ""
    what = f"{name} version {version}"
    fix = f"run `make reproduce MODEL=models:/{name}/{version}` first"
    if not verdict:
        return f"--require-reproduced: {what} was never reproduced (no `reproduced` tag): {fix}"
    return (
        f"--require-reproduced: {what} did not reproduce (reproduced={verdict}, largest "
        f"difference {tags.get('reproduced_max_diff', 'unrecorded')}, reproduction run "
        f"{tags.get('reproduced_by', 'unrecorded')}): nothing was evaluated or promoted. "
        f"Find why (reproduction.json in that run), train a version that reproduces, then {fix}"
    )


def check_reproduced(name: str, version: str) -> None:
    """Raise UserError, before any evaluation, unless the version reproduced
    (`validate --require-reproduced`)."""
    tags = mlflow.MlflowClient().get_model_version(name, version).tags or {}
    problem = reproduced_problem(tags, name, version)
    if problem:
        raise UserError(problem)
