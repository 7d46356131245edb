"""A sweep: a grid of parameter values, each combination one run in the image, several
at once through the launcher (make sweep), then a table of their final metrics."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

import yaml

from engine.common import PROJECT_DIR
from engine.config import UserError
from host.artifacts import first_run_options
from host.checkout import checkout_if_asked, remove_checkout
from host.facts import GpuInfo
from host.image import read_image_tag
from host.launch import Job, Launcher, start_mlflow_run
from host.plan import Plan, host_plan, run_gpu_args
from host.run import prepare_run, run_creator


def parse_param_values(items: Sequence[str]) -> dict[str, list[str]]:
    """-P name=v1,v2 items to {name: [v1, v2]} (a YAML grid file takes values with commas).

    Raises:
        UserError: for an item without "=" or with an empty value list.
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name.strip():
            raise UserError(f"-P {item!r}: write -P name=value or -P name=v1,v2,...")
        split = [value.strip() for value in values.split(",")]
        if not all(split):
            raise UserError(f"-P {item!r}: a value list must not have empty entries")
        grid[name.strip()] = split
    return grid


def load_grid_file(path: Path) -> dict[str, list[str]]:
    """A YAML grid: `name: value` or `name: [v1, v2]`, optionally under `parameters:`.

    Example:
        parameters:
          data_source: demo
          epochs: [1, 2]
          learning_rate: [0.001, 0.01]
    """
    spec = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(spec, dict) and set(spec) == {"parameters"}:
        spec = spec["parameters"]
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping of parameter names to values or lists")
    grid = {}
    for name, values in spec.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise UserError(f"{path}: {name} has an empty list of values")
        grid[str(name)] = [_yaml_scalar(value) for value in values]
    return grid


def _yaml_scalar(value: object) -> str:
    """A YAML value as mlflow run's -P takes it (true/false for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def expand_grid(grid: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """Every combination of the values, the first parameter varying slowest.

    >>> expand_grid({"epochs": ["1", "2"], "learning_rate": ["0.1"]})
    [{'epochs': '1', 'learning_rate': '0.1'}, {'epochs': '2', 'learning_rate': '0.1'}]
    """
    names = list(grid)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*grid.values())]


def check_param_names(points: Sequence[Mapping[str, str]], known: Sequence[str]) -> None:
    """Fail before launching anything when a parameter is not in MLproject's main."""
    unknown = sorted({name for point in points for name in point} - set(known))
    if unknown:
        raise UserError(
            f"unknown parameter(s) {', '.join(unknown)}; MLproject's main entry point "
            f"takes: {', '.join(known)}"
        )


def format_table(rows: Sequence[Mapping[str, object]]) -> str:
    """A plain text table with a header; columns are the union of the rows' keys."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    cells = [[_cell(row.get(column, "")) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(r[i]) for r in cells]) for i, column in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_sweep(
    points: Sequence[Mapping[str, str]],
    plan: Plan,
    gpus: GpuInfo,
    gpu_setting: str,
    parallel: int,
    create_run: Callable[[Mapping[str, str]], str],
    *,
    retries: int = 0,
    poll_seconds: float = 2.0,
    start: Callable = start_mlflow_run,
    out: TextIO | None = None,
) -> list[dict[str, object]]:
    """Launch the runs, at most `parallel` at once, each on its own GPU slot; wait for all.

    Args:
        points: each run's parameters.
        plan: the project, docker args and `mlflow run` options every run shares.
        gpus, gpu_setting: a slot's GPU (run_gpu_args).
        create_run: creates each run just before its launch and returns its id.
        retries: how many times a failed run is tried again (the launcher's rule).
        start: how the launcher starts `mlflow` (tests pass a fake).

    Returns:
        One row per run: its parameters, run id, status and final metrics.
    """
    out = out or sys.stdout
    jobs = [
        Job(params=dict(point), label=f"[{index + 1}/{len(points)}] ")
        for index, point in enumerate(points)
    ]

    def done(job: Job) -> None:
        said = job.status if job.status.startswith("NOT") else f"run {job.run_id} {job.status}"
        print(f"{job.label}{said}", file=out, flush=True)

    Launcher(
        plan,
        retries=retries,
        parallel=parallel,
        create_run=create_run,
        slot_docker_args=lambda slot: run_gpu_args(slot, gpus, gpu_setting),
        out=out,
        on_done=done,
        start=start,
        poll_seconds=poll_seconds,
    ).run(jobs)
    return result_rows(jobs)


def result_rows(jobs: Sequence[Job]) -> list[dict[str, object]]:
    """One row per ended job: its parameters, run id, status and the run's final metrics."""
    from mlflow import MlflowClient  # seconds to import: once, for the table at the end

    client = MlflowClient()
    rows: list[dict[str, object]] = []
    for job in jobs:
        row: dict[str, object] = {**job.params, "run_id": job.run_id, "status": job.status}
        if job.run_id and not job.status.startswith("NOT"):
            metrics = client.get_run(job.run_id).data.metrics
            row.update({name: metrics[name] for name in sorted(metrics)})
        rows.append(row)
    return rows


def sweep_main(
    param_items: Sequence[str],
    grid_file: Path | None,
    *,
    parallel: int,
    experiment_name: str | None,
    git_url: str,
    version: str,
    retries: int,
    base_image: str,
) -> int:
    """`make sweep`: check the names, plan, build, run every point, print the table.

    Args:
        param_items: -P name=v1,v2 items (parse_param_values).
        grid_file: a YAML grid (load_grid_file), or None; -P items win over it.
        parallel: runs at once (0: one per GPU, or 2 on the CPU).
        experiment_name: the experiment of every run (None: MLflow's choice).
        git_url, version: sweep a version from git ("" for the code here).
        retries: how many times a failed run is tried again.
        base_image: the image to build on ("" keeps the image's own).

    Returns:
        0 when every run finished, else 1.
    """
    grid = load_grid_file(grid_file) if grid_file else {}
    grid.update(parse_param_values(param_items))
    if not grid:
        raise UserError("nothing to sweep: give -P name=v1,v2 or --grid FILE")
    points = expand_grid(grid)
    spec = yaml.safe_load((PROJECT_DIR / "MLproject").read_text())
    check_param_names(points, list(spec["entry_points"]["main"]["parameters"]))
    plan, gpus = host_plan()
    os.environ["MLFLOW_TRACKING_URI"] = plan.tracking_uri
    try:
        project_dir = checkout_if_asked(plan, git_url, version)
        plan.project = str(project_dir)
        plan.run_args = ["--experiment-name", experiment_name] if experiment_name else []
        plan.say(sys.stdout)
        options = prepare_run(plan, project_dir, plan.run_args, base_image)
        options = options or first_run_options(plan, project_dir, plan.run_args)
        plan.say(sys.stdout)
        parallel = parallel or (gpus.count if gpus.runtime and gpus.count else 2)
        print(f"sweep: {len(points)} runs, {parallel} at once, image {read_image_tag()}")
        create_run = run_creator(plan, project_dir, options)
        gpu_setting = os.environ.get("GPUS", "auto")
        rows = run_sweep(points, plan, gpus, gpu_setting, parallel, create_run, retries=retries)
    finally:
        remove_checkout(plan)
    print()
    print(format_table(rows))
    failed = [row for row in rows if row["status"] != "FINISHED"]
    if failed:
        print(f"\n{len(failed)} of {len(rows)} runs did not finish", file=sys.stderr)
        return 1
    return 0
