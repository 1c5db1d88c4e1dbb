"""End to end: `msa demo` on a tiny synthetic corpus, through Prefect, Ray Train and MLflow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_demo_flow_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "msa-home"
    env = {
        **os.environ,
        "MSA_HOME": str(home),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "MLFLOW_TRACKING_URI": "",
        "PREFECT_API_URL": "",
    }
    env.pop("MLFLOW_TRACKING_URI")
    env.pop("PREFECT_API_URL")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "demo", "--demo-images", "60,20,20", "--epochs", "2", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parent.parent,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    # --json: stdout is one JSON document, the people's output (recall table, stores) is on stderr.
    result = json.loads(proc.stdout)
    header = re.search(r"i2t_R1\s+i2t_R5\s+i2t_R10\s+t2i_R1\s+t2i_R5\s+t2i_R10\s+mR\n\s+([\d. ]+)\n", proc.stderr)
    assert header, proc.stderr[-3000:]
    values = [float(v) for v in header.group(1).split()]
    assert len(values) == 7 and all(0.0 <= v <= 100.0 for v in values)
    assert abs(values[6] - sum(values[:6]) / 6) < 0.01
    assert values == [round(result["test"][k], 2) for k in ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5",
                                                             "t2i_R10", "mR")]
    assert re.search(r"chance mR \d+\.\d+", proc.stderr)
    # Per-epoch progress lines from rank 0.
    assert set(re.findall(r"\[msa\] epoch (\d)/2 loss", output)) == {"1", "2"}, output[-4000:]

    store = f"sqlite:///{home / 'mlflow.db'}"
    assert store in proc.stderr and result["run_id"]
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("msa")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert len(run.data.tags["dataset_digest"]) == 64
    assert run.data.params["preset"] == "small"
    history = client.get_metric_history(run.info.run_id, "val_mR")
    assert sorted(m.step for m in history) == [0, 1]
    for name in ("test_i2t_R1", "test_t2i_R10", "test_mR", "test_chance_mR", "train_loss"):
        assert name in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert artifacts == {"figures/recall_curves.png", "figures/retrieval_examples.png"}

    versions = client.search_model_versions("name='msa-retrieval'")
    assert len(versions) == 1
    assert versions[0].tags["dataset_digest"] == run.data.tags["dataset_digest"]

    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(f"models:/msa-retrieval/{versions[0].version}")
    image_bytes = next((home / "corpus" / "synth-demo" / "images").iterdir()).read_bytes()
    emb = model.predict(pd.DataFrame({"text": ["a river through farmland", None], "image": [None, image_bytes]}))
    assert emb.shape == (2, 128)
    assert abs(float((emb**2).sum(1)[0]) - 1.0) < 1e-4 and abs(float((emb**2).sum(1)[1]) - 1.0) < 1e-4
