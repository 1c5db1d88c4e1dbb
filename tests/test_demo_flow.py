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
ROOT = Path(__file__).resolve().parent.parent


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
        capture_output=True,  # bytes: text mode would turn the epoch bar's \r redraws into new lines
        timeout=900,
        cwd=ROOT,
    )
    stdout, stderr = proc.stdout.decode(), proc.stderr.decode()
    output = stdout + stderr
    assert proc.returncode == 0, output[-6000:]
    # --json: stdout is one JSON document, the people's output (recall table, stores) is on stderr.
    result = json.loads(stdout)
    header = re.search(r"i2t_R1\s+i2t_R5\s+i2t_R10\s+t2i_R1\s+t2i_R5\s+t2i_R10\s+mR\n\s+([\d. ]+)\n", stderr)
    assert header, stderr[-3000:]
    values = [float(v) for v in header.group(1).split()]
    assert len(values) == 7 and all(0.0 <= v <= 100.0 for v in values)
    assert abs(values[6] - sum(values[:6]) / 6) < 0.01
    assert values == [round(result["test"][k], 2) for k in ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5",
                                                             "t2i_R10", "mR")]
    assert re.search(r"chance mR \d+\.\d+", stderr)
    log = _assert_quiet_terminal(stderr)
    # Per-epoch progress lines from rank 0, in the log once each (Ray's print patch doubled them).
    assert sorted(re.findall(r"\[msa\] epoch (\d)/2 loss", log)) == ["1", "2"], log[-4000:]

    store = f"sqlite:///{home / 'mlflow.db'}"
    assert store in stderr and result["run_id"]
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
    _assert_tracked_like_mlflow_users_expect(client, store, run, versions[0], result)

    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(f"models:/msa-retrieval/{versions[0].version}")
    image_bytes = next((home / "corpus" / "synth-demo" / "images").iterdir()).read_bytes()
    emb = model.predict(pd.DataFrame({"text": ["a river through farmland", None], "image": [None, image_bytes]}))
    assert emb.shape == (2, 128)
    assert abs(float((emb**2).sum(1)[0]) - 1.0) < 1e-4 and abs(float((emb**2).sum(1)[1]) - 1.0) < 1e-4


def _assert_quiet_terminal(people: str) -> str:
    """The demo's terminal shows stages, one epoch bar and the outcome, on one screen; the full log is in the
    file it names. Returns that log."""
    lines = people.split("\n")  # terminal lines: the bar redraws itself with \r on its one line
    assert len(lines) <= 20, people
    assert not [line for line in lines if "WARNING" in line or "Reporting training result" in line
                or "RayTrainWorker" in line or "TrainController" in line or "Task run" in line], people
    stages = [line for line in lines if re.match(r"\[\d\d:\d\d\] ", line)]
    assert len(stages) == 5 and "training small preset on Ray (2 workers, 2 epochs)" in stages[2], people
    bar = [line for line in lines if "epoch " in line and "|" in line]
    assert len(bar) == 1 and re.fullmatch(r" +epoch 2/2 \|#+\| loss \d+\.\d+, val mR \d+\.\d+ *",
                                          bar[0].split("\r")[-1]), people
    named = re.search(r"^Full log: (\S+)$", people, re.M)
    log = (ROOT / named.group(1)).read_text()
    for full in ("Reporting training result", "Beginning flow run", "Started a local Ray instance", "msa.stages:"):
        assert full in log, full
    return log


def _assert_tracked_like_mlflow_users_expect(client: MlflowClient, store: str, run, version, result: dict) -> None:
    """System metrics, the test split as an evaluation dataset, an input example, and the model card."""
    from mlflow.models import get_model_info

    from msa.config import MSAConfig
    from msa.runtime.tracking import model_card

    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    digest = run.data.tags["dataset_digest"]
    inputs = {tag.value: d.dataset for d in client.get_run(run.info.run_id).inputs.dataset_inputs for tag in d.tags
              if tag.key == "mlflow.data.context"}
    assert set(inputs) == {"training", "test"}
    assert inputs["test"].digest == digest[:36] and inputs["test"].name == f"shards-{digest[:16]}-test"
    assert json.loads(inputs["test"].source)["url"] == Path(run.data.tags["data_uri"]).as_uri()

    mlflow.set_tracking_uri(store)
    model_uri = f"models:/msa-retrieval/{version.version}"
    assert get_model_info(model_uri).saved_input_example_info["type"] == "dataframe"
    cfg = MSAConfig.from_dict(mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/config.json"))
    expected = model_card(version=version.version, cfg=cfg, corpus="synth", data_uri=run.data.tags["data_uri"],
                          dataset_digest=digest, test=result["test"], run_id=run.info.run_id, tracking_uri=store)
    assert client.get_model_version("msa-retrieval", version.version).description == expected
