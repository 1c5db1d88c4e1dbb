"""MLflow at the edge: one run per training, its metrics, artifacts, model and registry version.

Names that tie the product together live here: experiment ``msa``, registered model
``msa-retrieval``, aliases ``champion``/``challenger``, and the dataset digest tag.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from msa.config import MSAConfig
from msa.paths import LOCAL_STATE, PROJECT_ROOT
from msa.runtime.spec import RunSpec

EXPERIMENT = "msa"
REGISTERED_MODEL = "msa-retrieval"
CHAMPION, CHALLENGER = "champion", "challenger"
DIGEST_TAG = "dataset_digest"


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else a project-local SQLite store (never ./mlruns in the cwd)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{LOCAL_STATE / 'mlflow.db'}"


def use_tracking(uri: str | None) -> str:
    uri = uri or default_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(name: str = EXPERIMENT) -> str:
    """Experiment id; a file store's artifacts go under .msa/, not the caller's cwd."""
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        location = (LOCAL_STATE / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently by another process
        return mlflow.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_training_run(
    cfg: MSAConfig,
    spec: RunSpec | None = None,
    *,
    dataset_digest: str,
    data_uri: str,
    run_name: str,
    extra_params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create the run, log the resolved config whole (params + config.json), the run spec (``run.*``
    params: resources and where things are stored), tags and the dataset input."""
    experiment_id = ensure_experiment()
    client = MlflowClient()
    tags = {
        DIGEST_TAG: dataset_digest,
        "git_commit": git_commit(),
        "preset": cfg.preset,
        "data_uri": data_uri,
        "mlflow.runName": run_name,
    }
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    run_params = {f"run.{k}": v for k, v in spec.model_dump().items()} if spec is not None else {}
    params = {**cfg.flat_params(), **{k: str(v) for k, v in {**run_params, **(extra_params or {})}.items()}}
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in params.items()])
    client.log_dict(run_id, cfg.to_dict(), "config.json")
    _log_dataset_input(run_id, dataset_digest, data_uri)
    return run_id


def _log_dataset_input(run_id: str, digest: str, data_uri: str) -> None:
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    source = _dataset_source(data_uri)
    dataset = MetaDataset(source=source, name=f"shards-{digest[:16]}", digest=digest[:36])
    MlflowClient().log_inputs(
        run_id,
        datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])],
    )


def _dataset_source(data_uri: str):
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    url = data_uri if "://" in data_uri else Path(data_uri).resolve().as_uri()
    return HTTPDatasetSource(url=url)


def log_metrics(run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(mlflow.utils.time.get_current_time_millis())
    MlflowClient().log_batch(run_id,
                             metrics=[mlflow.entities.Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), artifact_path)


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status)


def register_model(model_uri: str, dataset_digest: str, metrics: dict[str, float]) -> str:
    """A new version of ``msa-retrieval`` that cites its digest and test recalls; returns the version."""
    version = mlflow.register_model(
        model_uri,
        REGISTERED_MODEL,
        tags={DIGEST_TAG: dataset_digest, **{f"test_{k}": f"{v:.4f}" for k, v in metrics.items()}},
    )
    return str(version.version)
