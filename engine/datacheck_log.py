"""The data check's verdict before a run, and its record in the run.

`before_run` (in engine.training.run_training, right after prepare, before any MLflow
run exists) prints the one summary line (warn), or refuses to train while label
conflicts or duplicates across the source's splits remain (strict, a UserError naming
the files). `log_check` (the chief's log_setup) logs data_check.json, the data_*
metrics and data_check.png, a contact sheet of the worst findings: each row a pair side
by side, labelled with its path, class and split.
"""

from __future__ import annotations

import mlflow
import numpy as np

from engine.config import RunConfig, UserError
from engine.datacheck import ARTIFACT, DataCheck
from engine.evaluation import _pyplot
from engine.images import DataInfo

SHOWN = 10  # files named in strict's refusal


def before_run(info: DataInfo, cfg: RunConfig) -> None:
    """Print the check's line (warn), or refuse to train on what strict forbids.

    Raises:
        UserError: --data-check strict, while label conflicts or duplicates across the
            source's splits remain; it names the files.
    """
    check = info.data_check
    if cfg.data_check == "off":
        return
    if check is None:
        print(
            f"data check: skipped for data source '{info.source or 'data'}' (its pipelines "
            "are not made by engine.images.files_pipeline or arrays_pipeline, where the "
            "check runs)"
        )
        return
    print(check.summary)
    if cfg.data_check == "strict" and check.problems:
        shown = "; ".join(check.problems[:SHOWN])
        more = f"; and {len(check.problems) - SHOWN} more" if len(check.problems) > SHOWN else ""
        raise UserError(
            f"--data-check strict refuses to train: {len(check.problems)} label conflict(s) "
            f"or duplicate group(s) across splits remain: {shown}{more}. Remove or relabel "
            "those files (data_check.json of a --data-check warn run lists them all), or "
            "train with --data-check warn."
        )


def log_check(check: DataCheck | None) -> None:
    """Log the report, its metrics and its contact sheet into the active run."""
    if check is None:
        return
    mlflow.log_dict(check.report, ARTIFACT)
    mlflow.log_metrics(check.metrics)
    if check.sheet:
        figure = contact_sheet(check.sheet)
        mlflow.log_figure(figure, "data_check.png")
        _pyplot().close(figure)


def contact_sheet(rows: list[list[tuple[np.ndarray, str]]]):
    """A matplotlib figure of rows of images side by side, each with its caption."""
    plt = _pyplot()
    columns = max(len(row) for row in rows)
    figure, axes = plt.subplots(
        len(rows), columns, figsize=(3.2 * columns, 3.4 * len(rows)), squeeze=False
    )
    for r, row in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                pixels, caption = row[c]
                gray = pixels.shape[-1] == 1
                ax.imshow(pixels.squeeze(), cmap="gray" if gray else None, vmin=0, vmax=255)
                ax.set_title(caption, fontsize=7)
    figure.suptitle("data check: the worst findings (label conflicts first)", fontsize=9)
    figure.tight_layout()
    return figure
