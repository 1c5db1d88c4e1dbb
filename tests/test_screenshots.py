"""docs/screenshots.py without a browser: its --help, the MLflow and Prefect UI URLs it opens, the shot list
and the PNG size budget. Taking the screenshots needs Chromium and a training run (see the script)."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docs" / "screenshots.py"
MLFLOW = "http://127.0.0.1:5000/"
API = "http://127.0.0.1:4200/api"
RUN = "0123456789abcdef0123456789abcdef"
FLOW_RUN = "6f1c2a4e-0b7d-4c51-9a43-2f3c1d0e9b88"


@pytest.fixture(scope="module")
def shots():
    spec = importlib.util.spec_from_file_location("docs_screenshots", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_help_runs_from_anywhere_and_says_what_it_needs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for text in ("--running", "Chromium", "docs/img/", "--demo-images"):
        assert text in proc.stdout, text


def test_missing_chromium_is_named_before_anything_starts(tmp_path: Path) -> None:
    # --running without a stack in the environment: should the check ever go, this fails fast, starting nothing.
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--running", "--chromium", str(tmp_path / "no-chromium")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "apt-get install chromium" in proc.stderr


def test_mlflow_urls(shots) -> None:
    run_page = f"http://127.0.0.1:5000/#/experiments/3/runs/{RUN}"
    assert shots.mlflow_run_tab_url(MLFLOW, "3", RUN, "model-metrics") == f"{run_page}/model-metrics"
    assert (shots.mlflow_artifact_url(MLFLOW, "3", RUN, "figures/recall_curves.png")
            == f"{run_page}/artifacts/figures/recall_curves.png")
    assert shots.mlflow_artifact_url(MLFLOW, "3", RUN, "a b.png").endswith("/artifacts/a%20b.png")
    with pytest.raises(ValueError, match="not an MLflow tracking server"):
        shots.mlflow_run_tab_url("sqlite:///mlflow.db", "3", RUN, "model-metrics")


def test_prefect_urls_open_the_default_v2_ui(shots) -> None:
    assert shots.prefect_ui_base(API + "/") == "http://127.0.0.1:4200/v2"
    assert (shots.prefect_flow_run_url(API, FLOW_RUN, "Artifacts")
            == f"http://127.0.0.1:4200/v2/runs/flow-run/{FLOW_RUN}?tab=Artifacts")
    assert shots.prefect_flow_run_url(API, FLOW_RUN) == f"http://127.0.0.1:4200/v2/runs/flow-run/{FLOW_RUN}"
    assert shots.prefect_artifact_url(API, "a1") == "http://127.0.0.1:4200/v2/artifacts/artifact/a1"
    with pytest.raises(ValueError, match="ends in /api"):
        shots.prefect_ui_base("http://127.0.0.1:4200")


def test_planned_shots_cover_metrics_curves_and_the_recall_table(shots) -> None:
    env = {"MLFLOW_TRACKING_URI": MLFLOW, "PREFECT_API_URL": API}
    found = [SimpleNamespace(key="train-msa-summary", id="s1", type="markdown"),
             SimpleNamespace(key="train-msa-test-recall", id="t1", type="table")]
    planned = {s.name: s for s in shots.planned_shots(env, "3", RUN, FLOW_RUN, found)}
    assert planned["mlflow-model-metrics"].url.endswith(f"/runs/{RUN}/model-metrics")
    assert "val_mR" in planned["mlflow-model-metrics"].expect
    assert planned["mlflow-recall-curves"].url.endswith("/artifacts/figures/recall_curves.png")
    assert planned["prefect-flow-run-artifacts"].url.endswith("?tab=Artifacts")
    assert planned["prefect-recall-table"].url.endswith("/artifacts/artifact/t1")
    with pytest.raises(SystemExit, match="train-msa-test-recall"):
        shots.planned_shots(env, "3", RUN, FLOW_RUN, found[:1])


def test_png_is_kept_under_the_budget(shots, tmp_path: Path) -> None:
    from PIL import Image

    noise = Image.effect_noise((400, 300), 80).convert("RGB")  # incompressible: forces quantize, then resize
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    out = tmp_path / "img" / "shot.png"
    size = shots.save_png(buffer.getvalue(), out, max_bytes=40_000)
    assert size == out.stat().st_size <= 40_000 < len(buffer.getvalue())
    with Image.open(out) as saved:
        assert saved.width < 400 and saved.width / saved.height == pytest.approx(400 / 300, rel=0.02)
    assert not list(out.parent.glob("*.tmp"))


def test_mlflow_ids_come_from_the_flow_runs_link_to_its_run(shots) -> None:
    from flows import artifacts

    url = artifacts.mlflow_run_url(MLFLOW, "3", RUN)
    linked = [SimpleNamespace(key="train-msa-mlflow-run", data=f"[MLflow run msa-small-1]({url})")]
    assert shots.mlflow_ids(linked) == ("3", RUN)
    no_server = [SimpleNamespace(key="train-msa-mlflow-run", data="# MLflow run\n\n| run id | `abc` |")]
    with pytest.raises(SystemExit, match="tracking server"):
        shots.mlflow_ids(no_server)
