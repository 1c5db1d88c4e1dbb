"""The local stack end to end: `prefect deployment run train-msa/train-msa --watch` on a real
Prefect server and process worker, logging to a real MLflow server; the flow run's artifacts are
read back through the Prefect API."""

from __future__ import annotations

import json
import os
import re
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
        # Through a tracking server too: the model card on the version, system metrics from the Ray worker.
        assert f"| dataset digest | `{run.data.tags['dataset_digest']}` |" in version.description
        assert "system/cpu_utilization_percentage" in run.data.metrics
        # Artifacts went through the server's proxy into its artifact root, not the client's cwd.
        assert any((state / "mlartifacts").rglob("checkpoint.pt"))
        _assert_train_artifacts(stack_env, run, version)
    finally:
        down(state, env_file)
    assert not env_file.exists()


def _assert_train_artifacts(stack_env: dict[str, str], run, version) -> None:
    """The flow run's Prefect artifacts, read through the Prefect API, agree with what MLflow recorded."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from msa.metrics import RECALL_KEYS

    with temporary_settings(updates={PREFECT_API_URL: stack_env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as prefect:
            (flow_run,) = prefect.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train-msa"])))
            found = prefect.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    by_key = {a.key: a for a in found}
    assert {"train-msa-test-recall", "train-msa-summary", "train-msa-mlflow-run",
            "train-msa-model-version"} <= set(by_key), [a.key for a in found]

    metrics = run.data.metrics
    rows = json.loads(by_key["train-msa-test-recall"].data)
    assert [r["metric"] for r in rows] == [*RECALL_KEYS, "chance_mR"]
    for row in rows:
        assert row["recall_pct"] == pytest.approx(metrics[f"test_{row['metric']}"], abs=0.006), row

    tracking_uri = stack_env["MLFLOW_TRACKING_URI"].rstrip("/")
    run_link = f"{tracking_uri}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id})"
    assert run_link in by_key["train-msa-mlflow-run"].data
    model_link = f"{tracking_uri}/#/models/msa-retrieval/versions/{version.version})"
    assert model_link in by_key["train-msa-model-version"].data

    summary = by_key["train-msa-summary"].data
    assert "| preset | `small` |" in summary
    assert f"| dataset digest | `{run.data.tags['dataset_digest']}` |" in summary
    assert f"| selected epoch | {int(metrics['selected_epoch']) + 1} " in summary
    checkpoint = re.search(r"\| checkpoint \| `([^`]+)` \|", summary)
    assert checkpoint and "checkpoint" in checkpoint.group(1).rsplit("/", 1)[-1], summary
    assert "://" in checkpoint.group(1) or Path(checkpoint.group(1)).is_dir(), summary
