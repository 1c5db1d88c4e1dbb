"""The Prefect artifacts the flows publish (flows.artifacts).

The builders are unit-tested with plain data; ``publish_training`` is checked with Prefect's create
functions recorded (both tracking-store cases). ``shard-corpus`` runs against the real Prefect server of
the local stack and its artifacts are read back through the Prefect API. train-msa's artifacts on a real
run are checked in tests/test_stack.py (the deployment run).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from flows import artifacts
from msa.metrics import RECALL_KEYS

TEST = {"i2t_R1": 9.0, "i2t_R5": 37.004, "i2t_R10": 60.0, "t2i_R1": 8.2, "t2i_R5": 41.4, "t2i_R10": 58.8,
        "mR": 35.7340, "chance_mR": 5.2631, "selected_epoch": 4.0}
TRAINED = {"run_id": "0123abcd", "run_name": "msa-small-deadbeef-20261128", "dataset_digest": "f" * 64,
           "best_checkpoint": "/state/ray_results/msa-small/checkpoint_000004", "best_val": {}, "history": []}
DECISION = {
    "model_name": "msa-retrieval", "candidate_version": "7", "champion_version": "5", "decision": "kept",
    "reason": "candidate mR 30.00 does not beat champion mR 31.00 by 0.5 | points", "candidate_mR": 30.0,
    "champion_mR": 31.0, "margin": 0.5, "dataset_digest": "a" * 64, "data_uri": "s3://bucket/shards",
    "candidate_metrics": {}, "champion_metrics": {}, "attempts": 1, "run_id": "9f9f",
}


def test_keys_are_lowercase_dash() -> None:
    keys = [v for k, v in vars(artifacts).items() if k.endswith("_KEY")]
    assert len(keys) == 8 and len(set(keys)) == 8
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", key) for key in keys), keys


def test_recall_rows_are_the_recalls_then_chance_in_percent() -> None:
    rows = artifacts.recall_rows(TEST)
    assert [r["metric"] for r in rows] == [*RECALL_KEYS, "chance_mR"]
    assert rows[1] == {"metric": "i2t_R5", "recall_pct": 37.0}
    assert rows[-2:] == [{"metric": "mR", "recall_pct": 35.73}, {"metric": "chance_mR", "recall_pct": 5.26}]
    with pytest.raises(KeyError):
        artifacts.recall_rows({k: 1.0 for k in RECALL_KEYS})  # the chance level is part of the table


def test_mlflow_urls_only_for_a_tracking_server() -> None:
    assert artifacts.mlflow_run_url("http://127.0.0.1:5000/", "3", "abc") == "http://127.0.0.1:5000/#/experiments/3/runs/abc"
    assert (artifacts.model_version_url("https://mlflow.example.org", "msa retrieval", "2")
            == "https://mlflow.example.org/#/models/msa%20retrieval/versions/2")
    for store in ("sqlite:///tmp/mlflow.db", "file:///tmp/mlruns", "/tmp/mlruns", "databricks"):
        assert artifacts.mlflow_run_url(store, "3", "abc") is None
        assert artifacts.model_version_url(store, "msa-retrieval", "2") is None
    assert artifacts.model_version_uri("msa-retrieval", "2") == "models:/msa-retrieval/2"


def test_train_summary_names_preset_digest_epoch_and_checkpoint() -> None:
    text = artifacts.train_summary_markdown(
        preset="small", dataset_digest="f" * 64, data_uri="/data/shards", selected_epoch=4,
        checkpoint=TRAINED["best_checkpoint"], run_id="0123abcd", run_name="r", model_name="msa-retrieval",
        model_version="3", tracking_uri="sqlite:///x.db", test=TEST,
    )
    assert "| preset | `small` |" in text
    assert f"| dataset digest | `{'f' * 64}` |" in text
    assert "| selected epoch | 5 (best validation mR) |" in text  # 1-based, as `msa train` prints it
    assert f"| checkpoint | `{TRAINED['best_checkpoint']}` |" in text
    assert "| model | `models:/msa-retrieval/3` |" in text
    assert "35.73 (chance 5.26)" in text


def test_promotion_markdown_has_both_versions_margin_reason_and_digest() -> None:
    text = artifacts.promotion_markdown(DECISION)
    assert text.startswith("# promote-msa: kept")
    assert "| candidate | v7 | 30.00 |" in text and "| champion | v5 | 31.00 |" in text
    assert "| margin (mR points) | 0.5 |" in text and "| decision | kept |" in text
    assert f"`{'a' * 64}`" in text
    assert "by 0.5 \\| points" in text  # the reason, its pipe escaped for the table syntax
    first = artifacts.promotion_markdown({**DECISION, "champion_version": None, "champion_mR": None,
                                          "decision": "promoted", "reason": "no champion yet"})
    assert "| champion | none | - |" in first and "promoted" in first


def test_split_counts_and_quarantine_report() -> None:
    counts = {"val": {"images": 1, "captions": 5, "shards": 1}, "train": {"images": 4, "captions": 20, "shards": 2}}
    assert artifacts.split_count_rows(counts) == [
        {"split": "train", "images": 4, "captions": 20, "shards": 2},
        {"split": "val", "images": 1, "captions": 5, "shards": 1},
    ]
    assert artifacts.quarantine_markdown([]).endswith("\n\nnone")
    report = artifacts.quarantine_markdown([{"source": "a.jpg", "reason": "truncated JPEG\n(no EOI)"},
                                            {"source": "ann.csv line 3", "reason": "x | y"}])
    assert "2 quarantined" in report
    assert "| a.jpg | truncated JPEG (no EOI) |" in report and "| ann.csv line 3 | x \\| y |" in report


class _Recorder:
    def __init__(self, monkeypatch) -> None:
        self.calls: dict[str, tuple[str, object, dict]] = {}
        for kind in ("table", "link", "markdown"):
            monkeypatch.setattr(artifacts, f"create_{kind}_artifact", self._make(kind))

    def _make(self, kind: str):
        def create(data, **kwargs):
            self.calls[kwargs["key"]] = (kind, data, kwargs)

        return create


def test_publish_training_links_to_a_tracking_server(monkeypatch) -> None:
    import mlflow.tracking

    seen = []

    class Client:
        def __init__(self, uri):
            seen.append(uri)

        def get_run(self, run_id):
            return SimpleNamespace(info=SimpleNamespace(experiment_id="12"))

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", Client)
    rec = _Recorder(monkeypatch)
    artifacts.publish_training(TRAINED, TEST, "3", preset="small", data_uri="/d", tracking_uri="http://h:5000",
                               model_name="msa-retrieval")
    assert seen == ["http://h:5000"]
    assert set(rec.calls) == {"train-msa-test-recall", "train-msa-summary", "train-msa-mlflow-run",
                              "train-msa-model-version"}
    assert rec.calls["train-msa-test-recall"][:2] == ("table", artifacts.recall_rows(TEST))
    kind, link, kwargs = rec.calls["train-msa-mlflow-run"]
    assert (kind, link) == ("link", "http://h:5000/#/experiments/12/runs/0123abcd")
    assert kwargs["link_text"] == f"MLflow run {TRAINED['run_name']}"
    assert rec.calls["train-msa-model-version"][:2] == ("link", "http://h:5000/#/models/msa-retrieval/versions/3")
    assert rec.calls["train-msa-summary"][0] == "markdown"


def test_publish_training_names_run_and_model_uri_without_a_web_ui(monkeypatch) -> None:
    rec = _Recorder(monkeypatch)
    artifacts.publish_training(TRAINED, TEST, "3", preset="small", data_uri="/d", tracking_uri="sqlite:///m.db",
                               model_name="msa-retrieval")
    kinds = {key: kind for key, (kind, _, _) in rec.calls.items()}
    assert kinds == {"train-msa-test-recall": "table", "train-msa-summary": "markdown",
                     "train-msa-mlflow-run": "markdown", "train-msa-model-version": "markdown"}
    assert "| run id | `0123abcd` |" in rec.calls["train-msa-mlflow-run"][1]
    assert "| model uri | `models:/msa-retrieval/3` |" in rec.calls["train-msa-model-version"][1]
    assert "`sqlite:///m.db`" in rec.calls["train-msa-model-version"][1]


def test_publish_promotion(monkeypatch) -> None:
    rec = _Recorder(monkeypatch)
    artifacts.publish_promotion(DECISION)
    assert rec.calls["promote-msa-decision"][:2] == ("markdown", artifacts.promotion_markdown(DECISION))


# ---------------------------------------------------------------------------------- real server


@pytest.mark.slow
def test_shard_corpus_publishes_counts_and_quarantine(prefect_stack, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.shard_corpus import shard_corpus
    from shards.manifest import read_manifest
    from shards.synth import generate_corpus

    annotations = generate_corpus(tmp_path / "corpus", splits={"train": 4, "val": 1, "test": 1}, image_size=32)
    broken = json.loads(annotations.read_text())["images"][1]["filename"]  # a train image, end marker cut off
    image = tmp_path / "corpus" / "images" / broken
    image.write_bytes(image.read_bytes()[:-2])
    out = tmp_path / "shards"

    state = shard_corpus(str(annotations), str(tmp_path / "corpus" / "images"), str(out), corpus="synth",
                         on_error="skip", shard_size=2, return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    manifest = read_manifest(str(out))
    assert [q.source for q in manifest.quarantine] == [broken]

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    by_key = {a.key: a for a in found}
    assert set(by_key) == {"shard-corpus-counts", "shard-corpus-quarantine"}, [a.key for a in found]

    counts = by_key["shard-corpus-counts"]
    assert counts.type == "table"
    rows = json.loads(counts.data)
    assert rows == [{"split": split, "images": s.images, "captions": s.captions, "shards": len(s.shards)}
                    for split, s in sorted(manifest.splits.items())]
    assert {r["split"]: r["images"] for r in rows} == {"train": 3, "val": 1, "test": 1}
    assert next(r for r in rows if r["split"] == "train")["shards"] == 2  # 3 images, 2 per shard
    assert manifest.short_digest in counts.description

    quarantine = by_key["shard-corpus-quarantine"]
    assert quarantine.type == "markdown"
    assert "1 quarantined" in quarantine.data
    (entry,) = manifest.quarantine
    assert f"| {entry.source} | {entry.reason} |" in quarantine.data
    assert summary["quarantine"] == [{"source": entry.source, "reason": entry.reason}]
