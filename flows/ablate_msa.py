"""Prefect flow ``ablate-msa``: named config variants x seeds as one Ray Tune grid, tested and tabulated.

verify shards -> one Tune grid over (variant, seed), no early stopping (each trial: an MLflow child run,
one TorchTrainer, then the test split once at its best-validation checkpoint) -> the table (mean and
standard deviation over seeds of every recall; mR's difference to the first variant with a paired 95%
confidence interval) on the MLflow parent run (``ablation.json``, ``ablation.md``, ``figures/ablation.png``)
and as the flow run's ``ablate-msa-table`` artifact. Nothing is registered. The grid is a single task: the
task process is the Ray driver.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, task

from flows import artifacts
from flows.tasks import ready_dataset, with_epochs
from msa.config import resolve_config
from msa.paths import DEMO_SHARDS_URI
from msa.runtime import tracking
from msa.runtime.ablate import DEFAULT_SEEDS, DEFAULT_VARIANTS, AblationJob, run_ablation, validate_grid
from msa.runtime.spec import RunSpec


@task(name="ablate")
def ablate(job: dict[str, Any]) -> dict[str, Any]:
    return run_ablation(AblationJob(**job)).to_dict()


@flow(name="ablate-msa", log_prints=True)
def ablate_msa(
    data_uri: str = DEMO_SHARDS_URI,
    preset: str = "small",
    overrides: dict[str, Any] | None = None,
    epochs: int | None = None,
    variants: dict[str, dict[str, Any]] = DEFAULT_VARIANTS,
    seeds: list[int] = DEFAULT_SEEDS,
    max_concurrent_trials: int = 0,
    name: str | None = None,
    demo_images: dict[str, int] | None = None,
    workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    ray_address: str | None = None,
    storage_path: str | None = None,
    mlflow_uri: str | None = None,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Train every variant with every seed on a shard set and compare them on the test split.

    ``variants`` maps a name to dotted config overrides applied on top of ``preset`` + ``overrides``
    (default: full, no-consistency, no-alignment, triplet-only, infonce; see msa.runtime.ablate); the
    first variant is the reference of the paired differences. ``seeds`` are ``train.seed`` values. Each
    trial runs ``workers`` Ray Train workers with ``cpus_per_worker`` CPUs (one GPU each with ``use_gpu``);
    at most ``max_concurrent_trials`` trials run at once (0: as many as the cluster fits).
    """
    overrides = with_epochs(overrides, epochs)
    cfg = resolve_config(preset, overrides)
    variants = {str(k): dict(v) for k, v in variants.items()}
    seeds = [int(s) for s in seeds]
    validate_grid(variants, seeds, preset, overrides)
    spec = RunSpec(workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, max_failures=0,
                   ray_address=ray_address, storage_path=storage_path, mlflow_uri=mlflow_uri,
                   endpoint_url=endpoint_url)
    digest = ready_dataset(data_uri, cfg.image.size, spec.storage_options, demo_images)
    job = AblationJob(
        data_uri=data_uri,
        dataset_digest=digest,
        name=name or tracking.run_name("ablate", digest, cfg.preset),
        run=spec.model_dump(),
        preset=preset,
        overrides=overrides,
        variants=variants,
        seeds=seeds,
        max_concurrent_trials=max_concurrent_trials,
    )
    result = ablate(asdict(job))
    artifacts.publish_ablation(result)
    for trial in result["trials"]:
        test = "-" if "mR" not in trial["test"] else f"{trial['test']['mR']:.2f}"
        print(f"{trial['variant']} seed {trial['seed']}: {trial['status']}, test mR {test} (run {trial['run_id']})")
    print(result["markdown"])
    print(f"MLflow parent run {result['parent_run_id']} ({result['name']})")
    return result
