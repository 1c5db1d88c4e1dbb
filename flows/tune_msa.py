"""Prefect flow ``tune-msa``: Ray Tune over the training driver, then register the best trial.

verify shards -> Tune (one TorchTrainer per trial, ASHA early stopping, random or Optuna search;
an MLflow parent run with one child run per trial) -> test recall of the best trial's best
checkpoint -> new ``msa-retrieval`` version. Registration does not move ``champion``: run
``promote-msa`` for that. The tuning itself is a single task: the task process is the Ray driver.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, task

from flows.tasks import ready_dataset, with_epochs
from msa.config import resolve_config
from msa.paths import DEMO_SHARDS_URI
from msa.runtime import tracking
from msa.runtime.spec import RunSpec
from msa.runtime.tune import DEFAULT_SPACE, TuneJob, run_tune


@task(name="tune")
def tune(job: dict[str, Any], register_best: bool) -> dict[str, Any]:
    return run_tune(TuneJob(**job), register=register_best).to_dict()


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
    grace_period: int = 1,
    reduction_factor: float = 2.0,
    seed: int = 0,
    register_best: bool = True,
    name: str | None = None,
    demo_images: dict[str, int] | None = None,
    workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    ray_address: str | None = None,
    storage_path: str | None = None,
    mlflow_uri: str | None = None,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Tune MSA hyper-parameters on a shard set; returns the trials, the best one and its model version.

    ``space`` maps dotted config keys to distributions (see msa.runtime.tune; default: lr, weight decay,
    both loss weights, consistency temperature, batch size, backbone). ``search`` is "random" or
    "optuna"; ASHA stops trials on validation mR after ``grace_period`` epochs. Each trial runs
    ``workers`` Ray Train workers with ``cpus_per_worker`` CPUs (and one GPU each with ``use_gpu``);
    at most ``max_concurrent_trials`` trials run at once.
    """
    overrides = with_epochs(overrides, epochs)
    cfg = resolve_config(preset, overrides)
    spec = RunSpec(workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, max_failures=0,
                   ray_address=ray_address, storage_path=storage_path, mlflow_uri=mlflow_uri,
                   endpoint_url=endpoint_url)
    digest = ready_dataset(data_uri, cfg.image.size, spec.storage_options, demo_images)
    job = TuneJob(
        data_uri=data_uri,
        dataset_digest=digest,
        name=name or tracking.run_name("tune", digest, cfg.preset),
        run=spec.model_dump(),
        preset=preset,
        overrides=overrides,
        space=dict(space) if space else dict(DEFAULT_SPACE),
        search=search,
        num_samples=num_samples,
        max_concurrent_trials=max_concurrent_trials,
        grace_period=grace_period,
        reduction_factor=reduction_factor,
        seed=seed,
    )
    result = tune(asdict(job), register_best)
    for trial in result["trials"]:
        best = "-" if trial["best_val_mR"] is None else f"{trial['best_val_mR']:.2f}"
        print(f"trial {trial['trial_id']}: {trial['status']} after {trial['epochs']} epoch(s), best val mR {best}")
    print(f"best trial {result['best_trial_id']} (run {result['best_run_id']}); "
          f"registered version {result['model_version']}")
    return result
