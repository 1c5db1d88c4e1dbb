"""Corpus sharding: annotation readers, deterministic WebDataset shard writer, manifest, storage.

Only numpy, Pillow, fsspec/s3fs, tqdm and pydantic are used here (no torch, prefect or mlflow);
Ray only when the writer is asked to run on it (:mod:`shards.distributed`). Names are imported
lazily so worker processes load only what they need.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "InputError": "readers",
    "Problem": "readers",
    "Sample": "readers",
    "Listing": "readers",
    "KNOWN_CORPORA": "readers",
    "read_annotations": "readers",
    "read_karpathy": "readers",
    "read_generic": "readers",
    "detect_corpus": "readers",
    "write_shards": "writer",
    "Manifest": "manifest",
    "ShardInfo": "manifest",
    "SplitInfo": "manifest",
    "VerifyReport": "manifest",
    "read_manifest": "manifest",
    "verify_shards": "manifest",
    "StorageError": "storage",
    "TransientStorageError": "storage",
    "open_url": "storage",
    "register_webdataset_s3": "storage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'shards' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
