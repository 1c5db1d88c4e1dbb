"""Scheduled retraining: re-shard when the corpus changed, retrain, register, and ask for promotion.

1. ``reshard`` runs ``write_shards`` on the source corpus. It is idempotent: an unchanged corpus (same
   annotation bytes, image bytes and options: the manifest's ``source_digest``) writes nothing.
2. ``decide`` compares the source digest with the one recorded by the last FINISHED retrain run for
   this shard location (else the champion's ``source_digest`` tag). Equal, and not forced: nothing
   else happens. So a second run on an unchanged corpus is a no-op.
3. Otherwise: verify, train (a child run of an MLflow ``retrain`` run), evaluate on test, register a
   version tagged with the source digest, then promotion (msa.runtime.registry.promote). The retrain
   run is marked FINISHED last, so a run that failed half-way is retried next time.
"""

from __future__ import annotations

from typing import Any

from msa.config import MSAConfig
from msa.paths import DEMO_CORPUS_DIR
from msa.runtime import datasets, pipeline, registry, tracking
from msa.runtime.spec import RunSpec
from msa.runtime.tracking import DIGEST_TAG, REGISTERED_MODEL


def reshard(annotations: str | None, images_dir: str | None, data_uri: str, corpus: str | None,
            shard_size: int | None, image_size: int, storage_options: dict | None) -> dict[str, Any]:
    """Write (or find up to date) the shard set; no ``annotations`` means the synthetic demo corpus."""
    from shards.writer import write_shards

    if annotations is None:
        annotations, images_dir = datasets.demo_annotations(image_size), str(DEMO_CORPUS_DIR / "images")
        corpus, shard_size = corpus or "synth", shard_size or datasets.DEMO_SHARD_SIZE
    if images_dir is None:
        raise ValueError("images_dir is required with annotations")
    manifest = write_shards(annotations, images_dir, data_uri, corpus=corpus, shard_size=shard_size or 1000,
                            storage_options=storage_options, progress=False)
    return {
        "data_uri": manifest.uri or data_uri,
        "source_digest": manifest.source_digest,
        "dataset_digest": manifest.digest,
        "resharded": not manifest.reused,
    }


def decide(data_uri: str, source_digest: str, force: bool, spec: RunSpec,
           model_name: str = REGISTERED_MODEL) -> dict[str, Any]:
    """Train or not: only when the source digest differs from the last one trained here, or forced."""
    tracking.use_tracking(spec.mlflow_uri)
    last, where = registry.last_trained_source(data_uri, model_name)
    if force:
        return {"train": True, "reason": f"forced (last trained source {str(last)[:16]} from {where})"}
    if last is None:
        return {"train": True, "reason": f"nothing trained on this corpus yet ({where})"}
    if last != source_digest:
        return {"train": True, "reason": f"source digest changed: {last[:16]} ({where}) -> {source_digest[:16]}"}
    return {"train": False, "reason": f"source digest {source_digest[:16]} unchanged since {where}"}


def start_retrain_run(data_uri: str, source_digest: str, dataset_digest: str, reason: str, force: bool,
                      spec: RunSpec) -> str:
    return registry.start_run(
        tracking.run_name("retrain", dataset_digest),
        kind="retrain",
        tags={"data_uri": data_uri, registry.SOURCE_DIGEST_TAG: source_digest, DIGEST_TAG: dataset_digest},
        params={"reason": reason, "force": force},
        mlflow_uri=spec.mlflow_uri,
    )


def train_and_register(retrain_run_id: str, cfg: MSAConfig, spec: RunSpec, data_uri: str, dataset_digest: str,
                       source_digest: str) -> dict[str, Any]:
    """Train (a child run of the retrain run), test once, register a version tagged with the source digest."""
    trained = pipeline.train(
        cfg, spec, data_uri=data_uri, dataset_digest=dataset_digest, parent_run_id=retrain_run_id,
        run_name=tracking.run_name("retrain", dataset_digest, cfg.preset),
    )
    test = pipeline.evaluate_test(trained, data_uri=data_uri, spec=spec)
    version = pipeline.publish_model(trained, test, spec=spec)
    registry.set_version_tags(version, {registry.SOURCE_DIGEST_TAG: source_digest, "retrain_run_id": retrain_run_id})
    return {"run_id": trained.run_id, "model_version": version, "test": test}


def finish_retrain_run(run_id: str, outcome: dict[str, Any] | None) -> None:
    """FINISHED with the version and promotion decision, or FAILED when training did not get through."""
    if outcome is None or "promotion" not in outcome:
        tracking.finish_run(run_id, "FAILED")
        return
    registry.set_run_tags(run_id, {"model_version": outcome["model_version"],
                                   "promotion_decision": outcome["promotion"]["decision"]})
    tracking.finish_run(run_id)
