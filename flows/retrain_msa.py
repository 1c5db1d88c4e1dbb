"""Prefect flow ``retrain-msa``: re-shard when the corpus changed, retrain, and ask for promotion.

The steps and why they are safe to repeat are in msa.runtime.retrain. The deployment
``retrain-msa/retrain-msa`` carries a daily cron schedule that is inactive by default (see
prefect.yaml for how to turn it on); ``msa retrain`` runs this flow locally.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.lease import promotion_lease
from flows.tasks import verify_shards, with_epochs
from msa.config import MSAConfig, resolve_config
from msa.paths import DEMO_SHARDS_URI
from msa.runtime import registry, retrain
from msa.runtime.spec import RunSpec
from msa.runtime.tracking import REGISTERED_MODEL

reshard = task(name="reshard")(retrain.reshard)
decide = task(name="decide")(retrain.decide)
start_retrain_run = task(name="start-retrain-run")(retrain.start_retrain_run)
train_and_register = task(name="train-and-register")(retrain.train_and_register)


@task(name="promote")
def promote(version: str, data_uri: str, margin: float, spec: RunSpec) -> dict[str, Any]:
    return registry.promote(version, data_uri=data_uri, margin=margin, mlflow_uri=spec.mlflow_uri,
                            storage_options=spec.storage_options, model_name=REGISTERED_MODEL,
                            lease=promotion_lease(REGISTERED_MODEL)).to_dict()


@flow(name="retrain-msa", log_prints=True)
def retrain_msa(
    annotations: str | None = None,
    images_dir: str | None = None,
    data_uri: str = DEMO_SHARDS_URI,
    corpus: str | None = None,
    shard_size: int | None = None,
    preset: str = "small",
    overrides: dict[str, Any] | None = None,
    epochs: int | None = None,
    margin: float = 0.0,
    force: bool = False,
    workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 1,
    ray_address: str | None = None,
    storage_path: str | None = None,
    mlflow_uri: str | None = None,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Re-shard ``annotations``/``images_dir`` into ``data_uri``; retrain and promote if the corpus changed.

    With no ``annotations`` the synthetic demo corpus is used (generated when absent). ``shard_size``
    defaults to 1000 (50 for the demo corpus). ``force`` retrains even when the source digest is
    unchanged. Returns what happened and why.
    """
    log = get_run_logger()
    margin = registry.check_margin(margin)  # a bad margin fails here, not after a whole training run
    cfg: MSAConfig = resolve_config(preset, with_epochs(overrides, epochs))
    spec = RunSpec(workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, max_failures=max_failures,
                   ray_address=ray_address, storage_path=storage_path, mlflow_uri=mlflow_uri,
                   endpoint_url=endpoint_url)
    shards = reshard(annotations, images_dir, data_uri, corpus, shard_size, cfg.image.size, spec.storage_options)
    log.info("shards %s: %s, source digest %s, dataset digest %s", shards["data_uri"],
             "re-sharded" if shards["resharded"] else "up to date", shards["source_digest"][:16],
             shards["dataset_digest"][:16])
    plan = decide(shards["data_uri"], shards["source_digest"], force, spec)
    log.info("%s%s", "retraining: " if plan["train"] else "nothing to do: ", plan["reason"])
    result: dict[str, Any] = {**shards, "trained": plan["train"], "reason": plan["reason"]}
    if not plan["train"]:
        return result
    digest = verify_shards(shards["data_uri"], spec.storage_options)
    run_id = start_retrain_run(shards["data_uri"], shards["source_digest"], digest, plan["reason"], force, spec)
    outcome = None
    try:
        outcome = train_and_register(run_id, cfg, spec, shards["data_uri"], digest, shards["source_digest"])
        outcome["promotion"] = promote(outcome["model_version"], shards["data_uri"], margin, spec)
    finally:
        retrain.finish_retrain_run(run_id, outcome)
    log.info("version %s: %s (%s)", outcome["model_version"], outcome["promotion"]["decision"],
             outcome["promotion"]["reason"])
    return {**result, "retrain_run_id": run_id, **outcome}
