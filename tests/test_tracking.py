"""The per-epoch metrics logger keeps what the server could not take, and sends it later."""

from __future__ import annotations

import mlflow
import pytest

from engine.tracking import MlflowMetrics


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
