"""Prefect flow ``retrain-msa``: re-shard when the corpus changed, retrain, and ask for promotion.

1. ``write_shards`` on the source corpus. It is idempotent: an unchanged corpus (same annotation
   bytes, image bytes and options: the manifest's ``source_digest``) writes nothing.
2. The source digest is compared with the one recorded by the last FINISHED retrain run for this
   shard location (else the champion's ``source_digest`` tag). Equal, and not ``force``: nothing
   else happens (the result says why). So a second run on an unchanged corpus is a no-op.
3. Otherwise: verify the shards, train (msa.pipeline, a child run of an MLflow ``retrain`` run),
   evaluate on test, register a version tagged with the source digest, then promote-msa's logic:
   the new version becomes champion only if it beats the current one on the same test shards.
   The retrain run is marked FINISHED last, so a run that failed half-way is retried next time.

The deployment ``retrain-msa/retrain-msa`` carries a daily cron schedule that is inactive by
default (see prefect.yaml for how to turn it on). ``msa retrain`` runs the same steps without Prefect.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task

from msa import pipeline, registry, tracking
from msa.config import resolve_config
from msa.paths import DEMO_CORPUS_DIR, DEMO_SHARDS_URI, default_ray_storage
from msa.tracking import DIGEST_TAG, REGISTERED_MODEL
from shards.storage import endpoint_options

DEMO_IMAGES = {"train": 300, "val": 100, "test": 100}


# ---- the steps, as plain functions of plain data (the flow wraps each as a task) --------------


def reshard(
    annotations: str | None,
    images_dir: str | None,
    data_uri: str,
    corpus: str | None,
    shard_size: int,
    image_size: int,
    endpoint_url: str | None,
) -> dict[str, Any]:
    """Write (or find up to date) the shard set; the default corpus is the synthetic demo one."""
    from shards.writer import write_shards

    if annotations is None:
        annotations_path = DEMO_CORPUS_DIR / "dataset_synth.json"
        if not annotations_path.exists():
            from shards.synth import generate_corpus

            annotations_path = generate_corpus(DEMO_CORPUS_DIR, splits=DEMO_IMAGES, image_size=image_size, seed=0)
        annotations, images_dir, corpus = str(annotations_path), str(DEMO_CORPUS_DIR / "images"), corpus or "synth"
    if images_dir is None:
        raise ValueError("images_dir is required with annotations")
    manifest = write_shards(annotations, images_dir, data_uri, corpus=corpus, shard_size=shard_size,
                            storage_options=endpoint_options(endpoint_url), progress=False)
    return {
        "data_uri": manifest.uri or data_uri,
        "source_digest": manifest.source_digest,
        "dataset_digest": manifest.digest,
        "resharded": not manifest.reused,
    }


def decide(data_uri: str, source_digest: str, force: bool, mlflow_uri: str | None,
           model_name: str = REGISTERED_MODEL) -> dict[str, Any]:
    """Train or not: only when the source digest differs from the last one trained here, or forced."""
    tracking.use_tracking(mlflow_uri)
    last, where = registry.last_trained_source(data_uri, model_name)
    if force:
        return {"train": True, "reason": f"forced (last trained source {str(last)[:16]} from {where})"}
    if last is None:
        return {"train": True, "reason": f"nothing trained on this corpus yet ({where})"}
    if last != source_digest:
        return {"train": True, "reason": f"source digest changed: {last[:16]} ({where}) -> {source_digest[:16]}"}
    return {"train": False, "reason": f"source digest {source_digest[:16]} unchanged since {where}"}


def start_retrain_run(data_uri: str, source_digest: str, dataset_digest: str, reason: str, force: bool,
                      mlflow_uri: str | None) -> str:
    return registry.start_run(
        f"retrain-{dataset_digest[:8]}-{time.strftime('%Y%m%d-%H%M%S')}",
        kind="retrain",
        tags={"data_uri": data_uri, registry.SOURCE_DIGEST_TAG: source_digest, DIGEST_TAG: dataset_digest},
        params={"reason": reason, "force": force},
        mlflow_uri=mlflow_uri,
    )


def train_and_register(
    retrain_run_id: str,
    config: dict[str, Any],
    data_uri: str,
    dataset_digest: str,
    source_digest: str,
    workers: int,
    use_gpu: bool,
    storage_path: str | None,
    ray_address: str | None,
    endpoint_url: str | None,
    mlflow_uri: str | None,
) -> dict[str, Any]:
    """Train (a child run of the retrain run), test once, register a version tagged with the source digest."""
    from msa.config import MSAConfig

    cfg = MSAConfig.from_dict(config)
    options = endpoint_options(endpoint_url)
    trained = pipeline.train(
        cfg,
        data_uri=data_uri,
        dataset_digest=dataset_digest,
        run_name=f"retrain-{cfg.preset}-{dataset_digest[:8]}-{time.strftime('%Y%m%d-%H%M%S')}",
        storage_path=storage_path or default_ray_storage(),
        num_workers=workers,
        use_gpu=use_gpu,
        max_failures=1,
        ray_address=ray_address,
        mlflow_uri=mlflow_uri,
        storage_options=options,
        parent_run_id=retrain_run_id,
    )
    test = pipeline.evaluate_test(trained, data_uri=data_uri, mlflow_uri=mlflow_uri, storage_options=options)
    version = pipeline.publish_model(trained, test, mlflow_uri=mlflow_uri, storage_options=options)
    registry.set_version_tags(version, {registry.SOURCE_DIGEST_TAG: source_digest, "retrain_run_id": retrain_run_id})
    return {"run_id": trained.run_id, "model_version": version, "test": test}


def promote(version: str, data_uri: str, margin: float, endpoint_url: str | None,
            mlflow_uri: str | None) -> dict[str, Any]:
    return registry.promote(version, data_uri=data_uri, margin=margin, mlflow_uri=mlflow_uri,
                            storage_options=endpoint_options(endpoint_url)).to_dict()


def finish_retrain_run(run_id: str, outcome: dict[str, Any] | None) -> None:
    if outcome is None:
        tracking.finish_run(run_id, "FAILED")
        return
    registry.set_run_tags(run_id, {"model_version": outcome["model_version"],
                                   "promotion_decision": outcome["promotion"]["decision"]})
    tracking.finish_run(run_id)


@dataclass(frozen=True)
class _Steps:
    reshard: Any
    decide: Any
    start_retrain_run: Any
    train_and_register: Any
    promote: Any


PLAIN = _Steps(reshard, decide, start_retrain_run, train_and_register, promote)
TASKS = _Steps(
    task(name="reshard")(reshard),
    task(name="decide")(decide),
    task(name="start-retrain-run")(start_retrain_run),
    task(name="train-and-register")(train_and_register),
    task(name="promote")(promote),
)


def retrain(
    *,
    annotations: str | None = None,
    images_dir: str | None = None,
    data_uri: str = DEMO_SHARDS_URI,
    corpus: str | None = None,
    shard_size: int = 200,
    preset: str = "small",
    overrides: dict[str, Any] | None = None,
    epochs: int | None = None,
    workers: int = 2,
    use_gpu: bool = False,
    margin: float = 0.0,
    force: bool = False,
    mlflow_uri: str | None = None,
    storage_path: str | None = None,
    ray_address: str | None = None,
    endpoint_url: str | None = None,
    steps: _Steps = PLAIN,
    log=print,
) -> dict[str, Any]:
    """The retrain steps; ``steps=TASKS`` runs each as a Prefect task (the flow), PLAIN without Prefect."""
    overrides = dict(overrides or {})
    if epochs is not None:
        overrides["train.epochs"] = epochs
    cfg = resolve_config(preset, overrides)
    mlflow_uri = tracking.use_tracking(mlflow_uri)
    shards = steps.reshard(annotations, images_dir, data_uri, corpus, shard_size, cfg.image.size, endpoint_url)
    log(f"shards {shards['data_uri']}: {'re-sharded' if shards['resharded'] else 'up to date'}, "
        f"source digest {shards['source_digest'][:16]}, dataset digest {shards['dataset_digest'][:16]}")
    plan = steps.decide(shards["data_uri"], shards["source_digest"], force, mlflow_uri)
    log(("retraining: " if plan["train"] else "nothing to do: ") + plan["reason"])
    result: dict[str, Any] = {**shards, "trained": plan["train"], "reason": plan["reason"]}
    if not plan["train"]:
        return result
    digest = pipeline.verify_dataset(shards["data_uri"], endpoint_options(endpoint_url))
    run_id = steps.start_retrain_run(shards["data_uri"], shards["source_digest"], digest, plan["reason"], force,
                                     mlflow_uri)
    outcome = None
    try:
        outcome = steps.train_and_register(run_id, cfg.to_dict(), shards["data_uri"], digest, shards["source_digest"],
                                           workers, use_gpu, storage_path, ray_address, endpoint_url, mlflow_uri)
        outcome["promotion"] = steps.promote(outcome["model_version"], shards["data_uri"], margin, endpoint_url,
                                             mlflow_uri)
    finally:
        finish_retrain_run(run_id, outcome)
    promotion = outcome["promotion"]
    log(f"version {outcome['model_version']}: {promotion['decision']} ({promotion['reason']})")
    return {**result, "retrain_run_id": run_id, **outcome}


@flow(name="retrain-msa", log_prints=True)
def retrain_msa(
    annotations: str | None = None,
    images_dir: str | None = None,
    data_uri: str = DEMO_SHARDS_URI,
    corpus: str | None = None,
    shard_size: int = 200,
    preset: str = "small",
    overrides: dict[str, Any] | None = None,
    epochs: int | None = None,
    workers: int = 2,
    use_gpu: bool = False,
    margin: float = 0.0,
    force: bool = False,
    mlflow_uri: str | None = None,
    storage_path: str | None = None,
    ray_address: str | None = None,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Re-shard ``annotations``/``images_dir`` into ``data_uri``; retrain and promote if the corpus changed.

    With no ``annotations`` the synthetic demo corpus is used (generated when absent). ``force``
    retrains even when the source digest is unchanged. Returns what happened and why.
    """
    logger = get_run_logger()
    return retrain(
        annotations=annotations, images_dir=images_dir, data_uri=data_uri, corpus=corpus, shard_size=shard_size,
        preset=preset, overrides=overrides, epochs=epochs, workers=workers, use_gpu=use_gpu, margin=margin,
        force=force, mlflow_uri=mlflow_uri, storage_path=storage_path, ray_address=ray_address,
        endpoint_url=endpoint_url, steps=TASKS, log=logger.info,
    )
