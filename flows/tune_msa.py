"""Prefect flow ``tune-msa``: Ray Tune over the training driver, then register the best trial.

verify shards -> Tune (one TorchTrainer per trial, ASHA early stopping, random or Optuna search;
an MLflow parent run with one child run per trial) -> test recall of the best trial's best
checkpoint -> new ``msa-retrieval`` version. Registration does not move ``champion``: run
``promote-msa`` for that. The tuning itself is a single task: the task process is the Ray driver.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from prefect import flow, task

from msa import pipeline
from msa.config import resolve_config
from msa.paths import DEMO_CORPUS_DIR, DEMO_SHARDS_URI, default_ray_storage
from msa.tune import DEFAULT_SPACE, TuneJob, run_tune
from shards.manifest import manifest_exists
from shards.storage import endpoint_options


@task(name="prepare-demo-shards")
def prepare_demo_shards(data_uri: str, demo_images: dict[str, int], image_size: int) -> None:
    """The synthetic demo corpus and its shards, when the default location is empty (as train-msa)."""
    from shards.synth import generate_corpus
    from shards.writer import write_shards

    annotations = generate_corpus(DEMO_CORPUS_DIR, splits=demo_images, image_size=image_size, seed=0)
    write_shards(annotations, DEMO_CORPUS_DIR / "images", data_uri, corpus="synth", shard_size=200, progress=False)


@task(name="verify-shards")
def verify_shards_task(data_uri: str, endpoint_url: str | None) -> str:
    return pipeline.verify_dataset(data_uri, endpoint_options(endpoint_url))


@task(name="tune")
def tune_task(job: dict[str, Any], ray_address: str | None, register_best: bool) -> dict[str, Any]:
    return run_tune(TuneJob(**job), ray_address=ray_address, register=register_best).to_dict()


@flow(name="tune-msa", log_prints=True)
def tune_msa(
    data_uri: str = DEMO_SHARDS_URI,
    preset: str = "small",
    overrides: dict[str, Any] | None = None,
    epochs: int | None = None,
    space: dict[str, Any] | None = None,
    search: str = "random",
    num_samples: int = 8,
    max_concurrent_trials: int = 1,
    workers_per_trial: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    grace_period: int = 1,
    reduction_factor: float = 2.0,
    seed: int = 0,
    register_best: bool = True,
    ray_address: str | None = None,
    mlflow_uri: str | None = None,
    name: str | None = None,
    storage_path: str | None = None,
    endpoint_url: str | None = None,
    demo_images: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Tune MSA hyper-parameters on a shard set; returns the trials, the best one and its model version.

    ``space`` maps dotted config keys to distributions (see msa.tune; default: lr, weight decay,
    both loss weights, consistency temperature, batch size, backbone). ``search`` is "random" or
    "optuna"; ASHA stops trials on validation mR after ``grace_period`` epochs. Each trial runs
    ``workers_per_trial`` Ray Train workers with ``cpus_per_worker`` CPUs (and ``gpus_per_worker``
    GPUs: 0 or 1); at most ``max_concurrent_trials`` trials run at once.
    """
    overrides = dict(overrides or {})
    if epochs is not None:
        overrides["train.epochs"] = epochs
    cfg = resolve_config(preset, overrides)
    options = endpoint_options(endpoint_url)
    if not manifest_exists(data_uri, options):
        if data_uri != DEMO_SHARDS_URI:
            raise FileNotFoundError(f"{data_uri}: no manifest.json; shard the corpus first (msa shard / shard-corpus)")
        prepare_demo_shards(data_uri, demo_images or {"train": 300, "val": 100, "test": 100}, cfg.image.size)
    digest = verify_shards_task(data_uri, endpoint_url)
    job = TuneJob(
        data_uri=data_uri,
        dataset_digest=digest,
        storage_path=storage_path or default_ray_storage(),
        name=name or f"tune-{cfg.preset}-{digest[:8]}-{time.strftime('%Y%m%d-%H%M%S')}",
        preset=preset,
        overrides=overrides,
        space=dict(space) if space else dict(DEFAULT_SPACE),
        search=search,
        num_samples=num_samples,
        max_concurrent_trials=max_concurrent_trials,
        workers_per_trial=workers_per_trial,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        seed=seed,
        mlflow_uri=mlflow_uri,
        storage_options=options or {},
    )
    result = tune_task(asdict(job), ray_address, register_best)
    for trial in result["trials"]:
        best = "-" if trial["best_val_mR"] is None else f"{trial['best_val_mR']:.2f}"
        print(f"trial {trial['trial_id']}: {trial['status']} after {trial['epochs']} epoch(s), best val mR {best}")
    print(f"best trial {result['best_trial_id']} (run {result['best_run_id']}); "
          f"registered version {result['model_version']}")
    return result
