"""Faults mid-run, nothing lost: the MLflow server goes away during training and comes back (every epoch's
metrics reach the run, at their steps), or stays away (training goes on; the final step fails naming the
tracking URI and the epochs not logged). Corrupt checkpoints: tests/test_checkpoint.py."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import mlflow
import pytest
from conftest import _free_port, _start_mlflow_server, _stop
from mlflow.tracking import MlflowClient

from msa.config import resolve_config
from msa.data import plan_splits
from msa.engine import LocalCheckpoints, fit
from msa.runtime import tracking
from shards.manifest import read_manifest


@pytest.fixture
def tracking_uri():
    """Sets MLflow's tracking URI for the test (``tracking_uri(uri)``) and puts the previous one back."""
    previous = mlflow.get_tracking_uri()
    yield mlflow.set_tracking_uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def brief_client_retries(monkeypatch):
    """MLflow's client retries a refused connection once, at once: an outage outlasts its bound."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")


def _epoch(epoch: int) -> dict[str, float]:
    return {"epoch": epoch, "train_loss": 3.0 - epoch, "val_mR": 10.0 + epoch, "finished_at": 1_800_000_000.0 + epoch}


def test_server_down_to_the_end_training_goes_on_and_the_final_flush_names_the_tracking_uri(
        tracking_uri, brief_client_retries, caplog):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    tracking_uri(uri)
    metrics_log = tracking.EpochMetricsLog("0123456789abcdef")
    with caplog.at_level(logging.WARNING, logger="msa.runtime.tracking"):
        metrics_log.add(_epoch(0))  # neither call raises: training goes on
        metrics_log.add(_epoch(1))
    warnings = [r.getMessage() for r in caplog.records if r.name == "msa.runtime.tracking"]
    assert [w.split(" (")[0] for w in warnings] == [
        f"MLflow at {uri} unreachable: metrics of epoch(s) 0 held, to be sent with the next epoch",
        f"MLflow at {uri} unreachable: metrics of epoch(s) 0, 1 held, to be sent with the next epoch"]
    with pytest.raises(tracking.TrackingUnavailableError) as excinfo:
        metrics_log.flush()
    message = str(excinfo.value)
    assert message.startswith(f"MLflow tracking server {uri} unreachable: metrics of epoch(s) 0, 1 were not "
                              "logged to run 0123456789abcdef")
    assert "re-run the same training" in message


class OutageDuringTraining(LocalCheckpoints):
    """An in-process ``fit`` sink: LocalCheckpoints, and rank 0's MLflow logging exactly as RayReportSink does it
    (``tracking.EpochMetricsLog.add`` each epoch, ``flush`` at the end); ``after_logging(epoch)`` stages the fault."""

    def __init__(self, directory: Path, run_id: str, after_logging):
        super().__init__(directory, keep=1)
        self.metrics_log = tracking.EpochMetricsLog(run_id)
        self.after_logging = after_logging

    def end_epoch(self, metrics, write_checkpoint) -> None:
        self.metrics_log.add(metrics)
        self.after_logging(int(metrics["epoch"]))
        super().end_epoch(metrics, write_checkpoint)


@pytest.mark.slow
def test_mlflow_server_killed_and_restarted_mid_training_every_epoch_reaches_the_run(
        tiny_shards, tiny_overrides, tmp_path, tracking_uri, brief_client_retries, caplog):
    """A private server (the session's is shared) is killed after epoch 0's metrics and restarted on the same
    port and store after epoch 1's were refused: the run ends with epochs 0, 1, 2 at steps 0, 1, 2."""
    root, port = tmp_path / "mlflow", _free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    servers = [_start_mlflow_server(root, port)]
    try:
        tracking_uri(uri)
        run_id = MlflowClient().create_run(tracking.ensure_experiment()).info.run_id
        held = {}  # epoch -> the epochs held once that epoch was logged

        def stage(epoch: int) -> None:
            held[epoch] = sorted(sink.metrics_log.held)
            if epoch == 0:
                os.killpg(servers[-1].pid, signal.SIGKILL)  # the server dies, as in a crash
                servers[-1].wait(timeout=30)
            elif epoch == 1:
                servers.append(_start_mlflow_server(root, port))

        cfg = resolve_config("small", [f"{k}={v}" for k, v in {**tiny_overrides, "train.epochs": 3}.items()])
        manifest = read_manifest(tiny_shards)
        sink = OutageDuringTraining(tmp_path / "ckpt", run_id, stage)
        with caplog.at_level(logging.WARNING, logger="msa.runtime.tracking"):
            result = fit(cfg, plan_splits(manifest, cfg.train.val_fraction), sink=sink,
                         dataset_digest=manifest.digest, log=lambda line: None)
            sink.metrics_log.flush()

        client = MlflowClient()
        for key in ("val_mR", "train_loss"):
            points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert points == [(int(h["epoch"]), pytest.approx(h[key])) for h in result.history], key
        # epoch 1 was refused and held, then sent with epoch 2 once the server was back (not only by the flush)
        assert held == {0: [], 1: [1], 2: []}
        warnings = [r.getMessage() for r in caplog.records if r.name == "msa.runtime.tracking"]
        assert len(warnings) == 1 and warnings[0].startswith(f"MLflow at {uri} unreachable: metrics of epoch(s) 1 held")

        # A re-run that resumes sends the checkpoint's history again: nothing is stored twice.
        again = tracking.EpochMetricsLog(run_id)
        again.hold(result.history)
        again.flush()
        assert len(client.get_metric_history(run_id, "val_mR")) == 3
    finally:
        for server in servers:
            _stop(server)
