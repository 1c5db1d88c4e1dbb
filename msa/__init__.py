"""MSA (Multi-Scale Alignment) remote-sensing image-text retrieval: the model library.

The public API below is imported lazily (PEP 562), so ``import msa`` and the command line's
``--help`` stay fast; ``from msa import MSAModel`` loads torch only then.

Floors (checked by import-linter, see pyproject.toml): this package's core modules use torch, timm,
transformers and open_clip only; ``msa.runtime`` adds Ray, MLflow and the shard store; ``msa.retrieval``
and ``msa.bench`` sit beside it; ``flows`` (Prefect, the command line) sits on top.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MSAConfig": "msa.config",
    "resolve_config": "msa.config",
    "ConfigError": "msa.config",
    "MSAModel": "msa.model",
    "MSAOutput": "msa.model",
    "MSCMAT": "msa.mscmat",
    "compute_loss": "msa.losses",
    "alignment_loss": "msa.losses",
    "consistency_loss": "msa.losses",
    "hardest_triplet_loss": "msa.losses",
    "recall_at_k": "msa.metrics",
    "chance_recall": "msa.metrics",
    "RECALL_KEYS": "msa.metrics",
    "build_tokenizer": "msa.encoders",
    "tokenize": "msa.encoders",
    "ImageTransform": "msa.data",
    "fit": "msa.engine",
    "LocalCheckpoints": "msa.engine",
    "load_checkpoint": "msa.checkpoint",
    "model_from_checkpoint": "msa.checkpoint",
    "embed_split": "msa.evaluate",
    "evaluate_recall": "msa.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'msa' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
