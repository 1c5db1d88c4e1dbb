"""Prefect flow ``train-msa``: verify shards -> train on Ray -> evaluate on test -> register.

Tasks pass URIs, ids and plain dicts (never live models or filesystems), so results persist and
the same flow runs ad hoc (``msa demo``/``msa train``) or from the ``train-msa/train-msa`` deployment.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, task

from msa import pipeline
from msa.config import resolve_config
from msa.paths import DEMO_CORPUS_DIR, DEMO_SHARDS_URI, default_ray_storage
from shards.manifest import manifest_exists
from shards.storage import endpoint_options


@task(name="prepare-demo-shards")
def prepare_demo_shards(data_uri: str, demo_images: dict[str, int], image_size: int) -> None:
    """Make the synthetic demo corpus and its shards when the default location is empty."""
    from shards.synth import generate_corpus
    from shards.writer import write_shards

    logger = get_run_logger()
    logger.info("no shards at %s: generating the synthetic demo corpus %s", data_uri, demo_images)
    annotations = generate_corpus(DEMO_CORPUS_DIR, splits=demo_images, image_size=image_size, seed=0)
    write_shards(annotations, DEMO_CORPUS_DIR / "images", data_uri, corpus="synth", shard_size=50)


@task(name="verify-shards")
def verify_shards_task(data_uri: str, endpoint_url: str | None) -> str:
    return pipeline.verify_dataset(data_uri, endpoint_options(endpoint_url))


@task(name="train")
def train_task(
    config: dict[str, Any],
    data_uri: str,
    dataset_digest: str,
    run_name: str,
    storage_path: str,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    ray_address: str | None,
    mlflow_uri: str | None,
    endpoint_url: str | None,
) -> dict[str, Any]:
    from msa.config import MSAConfig

    trained = pipeline.train(
        MSAConfig.from_dict(config),
        data_uri=data_uri,
        dataset_digest=dataset_digest,
        run_name=run_name,
        storage_path=storage_path,
        num_workers=workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        max_failures=max_failures,
        ray_address=ray_address,
        mlflow_uri=mlflow_uri,
        storage_options=endpoint_options(endpoint_url),
    )
    return pipeline.trained_run_to_dict(trained)


@task(name="evaluate-test")
def evaluate_task(trained: dict[str, Any], data_uri: str, mlflow_uri: str | None, endpoint_url: str | None) -> dict:
    return pipeline.evaluate_test(
        pipeline.TrainedRun(**trained),
        data_uri=data_uri,
        mlflow_uri=mlflow_uri,
        storage_options=endpoint_options(endpoint_url),
    )


@task(name="register-model")
def register_task(trained: dict[str, Any], test_metrics: dict, mlflow_uri: str | None, endpoint_url: str | None) -> str:
    return pipeline.publish_model(
        pipeline.TrainedRun(**trained),
        test_metrics,
        mlflow_uri=mlflow_uri,
        storage_options=endpoint_options(endpoint_url),
    )


@flow(name="train-msa", log_prints=True)
def train_msa(
    data_uri: str = DEMO_SHARDS_URI,
    preset: str = "small",
    overrides: dict[str, Any] | None = None,
    epochs: int | None = None,
    workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 1,
    ray_address: str | None = None,
    mlflow_uri: str | None = None,
    run_name: str | None = None,
    storage_path: str | None = None,
    endpoint_url: str | None = None,
    demo_images: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Train MSA on a shard set and register the model; returns run id, model version and recalls.

    With the default ``data_uri`` the synthetic demo shards are generated when absent, so the
    deployment runs on a fresh clone. ``overrides`` are dotted config keys (``{"optim.lr": 1e-4}``).
    """
    overrides = dict(overrides or {})
    if epochs is not None:
        overrides["train.epochs"] = epochs
    cfg = resolve_config(preset, overrides)
    print(f"resolved config ({cfg.preset}):\n{cfg.to_json()}")
    options = endpoint_options(endpoint_url)
    if not manifest_exists(data_uri, options):
        if data_uri != DEMO_SHARDS_URI:
            raise FileNotFoundError(f"{data_uri}: no manifest.json; shard the corpus first (msa shard / shard-corpus)")
        prepare_demo_shards(data_uri, demo_images or {"train": 300, "val": 100, "test": 100}, cfg.image.size)
    digest = verify_shards_task(data_uri, endpoint_url)
    name = run_name or f"msa-{cfg.preset}-{digest[:8]}-{time.strftime('%Y%m%d-%H%M%S')}"
    trained = train_task(
        cfg.to_dict(),
        data_uri,
        digest,
        name,
        storage_path or default_ray_storage(),
        workers,
        use_gpu,
        cpus_per_worker,
        max_failures,
        ray_address,
        mlflow_uri,
        endpoint_url,
    )
    test_metrics = evaluate_task(trained, data_uri, mlflow_uri, endpoint_url)
    version = register_task(trained, test_metrics, mlflow_uri, endpoint_url)
    return {
        "run_id": trained["run_id"],
        "run_name": name,
        "model_version": version,
        "dataset_digest": digest,
        "test": test_metrics,
    }
