"""Prefect flow ``train-msa``: verify shards -> train on Ray -> evaluate on test -> register.

Artifacts on the run (flows.artifacts): the test recall table, a summary, links to the MLflow run and
the registered model version.

Runs ad hoc (``msa train``/``msa demo``) or from the ``train-msa/train-msa`` deployment; with the
default ``data_uri`` the synthetic demo shards are made when absent, so it runs on a fresh clone.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from prefect import flow, task

from flows import artifacts, console
from flows.tasks import ready_dataset, with_epochs
from msa.config import MSAConfig, resolve_config
from msa.paths import DEMO_SHARDS_URI
from msa.runtime import pipeline, tracking
from msa.runtime.spec import RunSpec


@task(name="train")
def train(cfg: MSAConfig, spec: RunSpec, data_uri: str, digest: str, run_name: str) -> dict[str, Any]:
    return asdict(pipeline.train(cfg, spec, data_uri=data_uri, dataset_digest=digest, run_name=run_name))


@task(name="evaluate-test")
def evaluate_test(trained: dict[str, Any], data_uri: str, spec: RunSpec) -> dict[str, float]:
    return pipeline.evaluate_test(pipeline.TrainedRun(**trained), data_uri=data_uri, spec=spec)


@task(name="register-model")
def register_model(trained: dict[str, Any], test_metrics: dict[str, float], spec: RunSpec) -> str:
    return pipeline.publish_model(pipeline.TrainedRun(**trained), test_metrics, spec=spec)


@flow(name="train-msa", log_prints=True)
def train_msa(
    data_uri: str = DEMO_SHARDS_URI,
    preset: str = "small",
    overrides: dict[str, Any] | None = None,
    epochs: int | None = None,
    run_name: str | None = None,
    demo_images: dict[str, int] | None = None,
    workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 1,
    ray_address: str | None = None,
    storage_path: str | None = None,
    mlflow_uri: str | None = None,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Train MSA on a shard set and register the model; returns run id, model version and test recalls.

    ``overrides`` are dotted config keys (``{"optim.lr": 1e-4}``); ``epochs`` sets ``train.epochs``.
    Reusing a ``run_name`` resumes that run's latest checkpoint. The other parameters are the run
    specification (msa.runtime.spec.RunSpec).
    """
    cfg = resolve_config(preset, with_epochs(overrides, epochs))
    spec = RunSpec(workers=workers, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, max_failures=max_failures,
                   ray_address=ray_address, storage_path=storage_path, mlflow_uri=mlflow_uri,
                   endpoint_url=endpoint_url)
    print(f"resolved config ({cfg.preset}):\n{cfg.to_json()}")
    console.stage(f"preparing and verifying the shards at {data_uri}")
    digest = ready_dataset(data_uri, cfg.image.size, spec.storage_options, demo_images)
    name = run_name or tracking.run_name("msa", digest, cfg.preset)
    console.stage(f"training {cfg.preset} preset on Ray ({spec.workers} workers, {cfg.train.epochs} epochs), "
                  f"dataset digest {digest[:16]}")
    trained = train(cfg, spec, data_uri, digest, name)
    console.stage(f"testing the best-validation checkpoint (epoch {int(trained['best_val']['epoch']) + 1})")
    test_metrics = evaluate_test(trained, data_uri, spec)
    console.stage("logging and registering the model in MLflow")
    version = register_model(trained, test_metrics, spec)
    artifacts.publish_training(trained, test_metrics, version, preset=cfg.preset, data_uri=data_uri,
                               tracking_uri=spec.mlflow_uri or tracking.default_tracking_uri(),
                               model_name=tracking.REGISTERED_MODEL)
    return {"run_id": trained["run_id"], "run_name": name, "model_version": version, "dataset_digest": digest,
            "test": test_metrics}
