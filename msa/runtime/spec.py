"""One typed run specification: where and how a job runs, built once at the edge and passed whole.

The command line generates its options from these fields (name, type, default, description) and the
flows take them as flat parameters of the same names, so a new run setting is declared here once.
This module imports only pydantic and the standard library: the command line's ``--help`` reads it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from msa.paths import default_ray_storage
from shards.storage import endpoint_options


class RunSpec(BaseModel):
    """Resources and services of one run (training, tuning, promotion, retraining)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workers: int = Field(2, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker")
    max_failures: int = Field(1, ge=0, description="worker failures survived by resuming from the last checkpoint")
    ray_address: str | None = Field(
        None, description="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    storage_path: str | None = Field(
        None, description="Ray checkpoint storage, local path or s3:// (default: .msa/ray_results)")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else .msa/mlflow.db)")
    endpoint_url: str | None = Field(None, description="S3 endpoint for s3:// URIs, e.g. a local MinIO or moto server")

    @property
    def storage(self) -> str:
        return self.storage_path or default_ray_storage()

    @property
    def storage_options(self) -> dict | None:
        """fsspec/s3fs options for shard and checkpoint URIs (credentials stay in the environment)."""
        return endpoint_options(self.endpoint_url)
