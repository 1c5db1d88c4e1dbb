"""Prefect tasks shared by the flows: each wraps one runtime function and passes plain data.

Every flow follows one pattern: its parameters are resolved into typed objects at the top
(``resolve_config``, ``RunSpec``), each step is a task over a runtime function, and the flow
returns a plain dict. Domain logic lives in ``msa.runtime``, never here.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from msa.runtime import datasets


@task(name="prepare-shards")
def prepare_shards(data_uri: str, image_size: int, storage_options: dict | None,
                   demo_images: dict[str, int] | None = None) -> bool:
    """Check the shard set exists; make the synthetic demo set when the default location is empty."""
    return datasets.ensure_shards(data_uri, image_size, storage_options, demo_images)


@task(name="verify-shards")
def verify_shards(data_uri: str, storage_options: dict | None) -> str:
    """Re-hash every shard against its manifest; returns the dataset digest."""
    return datasets.verify_dataset(data_uri, storage_options)


def with_epochs(overrides: dict[str, Any] | None, epochs: int | None) -> dict[str, Any]:
    """A flow's ``overrides`` with its ``epochs`` parameter, when given, as ``train.epochs``."""
    return {**(overrides or {}), **({"train.epochs": epochs} if epochs is not None else {})}


def ready_dataset(data_uri: str, image_size: int, storage_options: dict | None,
                  demo_images: dict[str, int] | None = None) -> str:
    """Make the demo shards when the default location is empty, re-hash every shard; the dataset digest."""
    prepare_shards(data_uri, image_size, storage_options, demo_images)
    return verify_shards(data_uri, storage_options)

