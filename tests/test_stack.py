"""The local stack end to end: `prefect deployment run train-msa/train-msa --watch` on a real
Prefect server and process worker, logging to a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from infra.stack import down, free_port, up

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_deployment_run_trains_and_registers(tmp_path: Path) -> None:
    state, env_file = tmp_path / "stack", tmp_path / "stack.env"
    try:
        stack_env = up(state, free_port(), free_port(), env_file)
        assert env_file.read_text().count("export ") == len(stack_env)
        env = {**os.environ, **stack_env}
        params = {"epochs": 1, "demo_images": {"train": 40, "val": 16, "test": 16}, "workers": 2}
        argv = ["prefect", "deployment", "run", "train-msa/train-msa", "--watch", "--watch-timeout", "800"]
        for key, value in params.items():
            argv += ["--param", f"{key}={json.dumps(value)}"]
        proc = subprocess.run(
            [str(Path(os.sys.executable).parent / argv[0]), *argv[1:]],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
        )
        worker_log = (state / "prefect-worker.log").read_text(errors="replace")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + worker_log[-5000:]
        assert "Completed" in proc.stdout

        client = MlflowClient(tracking_uri=stack_env["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("msa")
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED"
        assert "test_mR" in run.data.metrics and "val_mR" in run.data.metrics
        figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
        assert "figures/retrieval_examples.png" in figures
        (version,) = client.search_model_versions("name='msa-retrieval'")
        assert version.run_id == run.info.run_id
        assert version.tags["dataset_digest"] == run.data.tags["dataset_digest"]
        # Artifacts went through the server's proxy into its artifact root, not the client's cwd.
        assert any((state / "mlartifacts").rglob("checkpoint.pt"))
    finally:
        down(state, env_file)
    assert not env_file.exists()
