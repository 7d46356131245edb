"""The per-epoch metrics logger keeps what the server could not take, and sends it later."""

from __future__ import annotations

import mlflow
import pytest

from engine.tracking import MlflowMetrics, log_dataset


def test_epoch_metrics_are_kept_while_the_server_fails_then_sent(tracking_store, monkeypatch):
    real_log_metrics = mlflow.log_metrics

    def server_down(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("API request failed: connection refused")

    logger = MlflowMetrics()
    mlflow.set_experiment("metrics-buffer")  # not one a previous test left active
    with mlflow.start_run() as run:
        monkeypatch.setattr(mlflow, "log_metrics", server_down)
        logger.on_epoch_end(0, {"loss": 0.9, "val_loss": 1.0})
        logger.on_epoch_end(1, {"loss": 0.7, "val_loss": 0.8})
        assert [epoch for epoch, _ in logger.pending] == [0, 1]
        with pytest.raises(mlflow.exceptions.MlflowException):
            logger.flush()  # at the end of training, a server still down is an error

        monkeypatch.setattr(mlflow, "log_metrics", real_log_metrics)
        logger.on_epoch_end(2, {"loss": 0.5, "val_loss": 0.6})
        assert logger.pending == []

    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    steps = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
    assert steps == [(1, 1.0), (2, 0.8), (3, 0.6)]  # epochs numbered from 1


def test_a_dataset_a_concurrent_run_just_inserted_is_logged_on_the_next_try(
    tracking_store, monkeypatch
):
    """Two sweep runs once logged the same new dataset at the same moment: the server's
    insert of the second broke the unique key and the run failed. The first try here
    fails as that server answered; the next finds the row and links it."""
    real_log_input = mlflow.log_input
    tries = []

    def raced(*args, **kwargs):
        tries.append(1)
        if len(tries) == 1:
            raise mlflow.exceptions.MlflowException(
                "BAD_REQUEST: (sqlite3.IntegrityError) UNIQUE constraint failed: "
                "datasets.experiment_id, datasets.name, datasets.digest"
            )
        return real_log_input(*args, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", raced)
    lineage = {"name": "cells", "source": "/data", "digest": "abc123", "table": None}
    mlflow.set_experiment("dataset-race")
    with mlflow.start_run() as run:
        log_dataset(lineage)
    assert len(tries) == 2
    inputs = mlflow.MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("cells", "abc123")]


def test_other_dataset_errors_are_not_retried(tracking_store, monkeypatch):
    tries = []

    def refused(*args, **kwargs):
        tries.append(1)
        raise mlflow.exceptions.MlflowException("PERMISSION_DENIED: no write access")

    monkeypatch.setattr(mlflow, "log_input", refused)
    mlflow.set_experiment("dataset-refused")
    with mlflow.start_run(), pytest.raises(mlflow.exceptions.MlflowException, match="PERMISSION"):
        log_dataset({"name": "cells", "source": "/data", "digest": "abc123"})
    assert len(tries) == 1
