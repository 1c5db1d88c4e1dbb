"""retrain-msa on the local Prefect stack and a real MLflow server: the first run trains, registers
and promotes; a second run on the unchanged corpus is a no-op (also through `msa retrain`, without
Prefect); ``force`` would train; a changed corpus is re-sharded and trained again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main as msa_main
from flows.retrain_msa import retrain_msa
from msa.runtime import registry
from msa.runtime.retrain import decide
from msa.runtime.spec import RunSpec
from msa.runtime.tracking import REGISTERED_MODEL
from shards.manifest import read_manifest
from shards.synth import generate_corpus

pytestmark = pytest.mark.slow


def _versions(client: MlflowClient) -> list:
    return client.search_model_versions(f"name='{REGISTERED_MODEL}'")


def _retrain_runs(client: MlflowClient, data_uri: str) -> list:
    experiment = client.get_experiment_by_name("msa")
    return client.search_runs([experiment.experiment_id],
                              f"tags.`msa.kind` = 'retrain' and tags.data_uri = '{data_uri}'")


def test_retrain_trains_once_then_noop_until_corpus_changes(
    mlflow_server, tmp_path, prefect_stack, ray_cluster, tiny_overrides, capsys, fast_model_logging, monkeypatch
) -> None:
    client = MlflowClient(mlflow_server)
    corpus = tmp_path / "corpus"
    annotations = generate_corpus(corpus, splits={"train": 40, "val": 12, "test": 12}, image_size=32, seed=3)
    data_uri = str(tmp_path / "shards")
    params = dict(annotations=str(annotations), images_dir=str(corpus / "images"), data_uri=data_uri,
                  corpus="synth", overrides=tiny_overrides, epochs=1, workers=1, mlflow_uri=mlflow_server,
                  storage_path=str(tmp_path / "ray"))
    before = len(_versions(client))

    # 1. Nothing trained on this corpus yet: shard, train, register, promote.
    first = retrain_msa(**params)
    assert first["trained"] and first["resharded"], first
    assert "nothing trained" in first["reason"]
    version = first["model_version"]
    assert len(_versions(client)) == before + 1
    tags = client.get_model_version(REGISTERED_MODEL, version).tags
    assert tags[registry.SOURCE_DIGEST_TAG] == first["source_digest"] == read_manifest(data_uri).source_digest
    assert tags["promotion_decision"] == first["promotion"]["decision"] in ("promoted", "kept")
    assert first["promotion"]["dataset_digest"] == read_manifest(data_uri).digest
    (run,) = _retrain_runs(client, data_uri)
    assert run.info.status == "FINISHED" and run.data.tags["model_version"] == version
    training = client.get_run(first["run_id"])
    assert training.data.tags["mlflow.parentRunId"] == run.info.run_id

    # 2. Unchanged corpus: a no-op, with the reason; nothing new in MLflow.
    second = retrain_msa(**params)
    assert not second["trained"] and not second["resharded"], second
    assert "unchanged" in second["reason"] and run.info.run_id in second["reason"]
    assert len(_versions(client)) == before + 1 and len(_retrain_runs(client, data_uri)) == 1

    # The same through the command line (`msa retrain`): still a no-op.
    argv = ["retrain", str(annotations), "--images", str(corpus / "images"), "--out", data_uri,
            "--corpus", "synth", "--mlflow-uri", mlflow_server, "--json"]
    monkeypatch.setenv("PREFECT_HOME", prefect_stack["PREFECT_HOME"])  # the CLI defaults it under .msa/
    assert msa_main(argv) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["trained"] is False
    assert len(_versions(client)) == before + 1

    # force=True would train even so (the decision; a forced run trains like step 1).
    spec = RunSpec(mlflow_uri=mlflow_server)
    assert decide(data_uri, second["source_digest"], True, spec)["train"] is True
    assert decide(data_uri, second["source_digest"], False, spec)["train"] is False

    # 3. The corpus changes (one caption edited): re-sharded, trained, registered again.
    data = json.loads(Path(annotations).read_text())
    data["images"][0]["sentences"][0]["raw"] += " near a small pond"
    data["images"][0]["sentences"][0]["tokens"] = data["images"][0]["sentences"][0]["raw"].split()
    Path(annotations).write_text(json.dumps(data))
    third = retrain_msa(**params)
    assert third["trained"] and third["resharded"], third
    assert third["source_digest"] != first["source_digest"] and "changed" in third["reason"]
    assert len(_versions(client)) == before + 2
    assert client.get_model_version(REGISTERED_MODEL, third["model_version"]).tags[
        registry.SOURCE_DIGEST_TAG] == third["source_digest"]
    assert len(_retrain_runs(client, data_uri)) == 2
    assert third["promotion"]["candidate_version"] == third["model_version"]
    assert "champion" in client.get_registered_model(REGISTERED_MODEL).aliases  # never left without one
