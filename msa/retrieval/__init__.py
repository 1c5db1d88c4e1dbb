"""Retrieval over a prebuilt index: embed a shard split once, then answer text or image queries.

- ``msa.retrieval.index``: the index directory format (documented there), ``Index.load`` with
  validation (``IndexFormatError`` names the bad file), ``build_index`` (written atomically: temp dir,
  then rename) and ``check_model``, which refuses a model other than the one the index was built with
  (``ModelIndexMismatch``).
- ``msa.retrieval.search``: ``search_text`` / ``search_image`` rank by cosine of the global embeddings
  and optionally re-rank the top candidates with MSCMAT (``rerank``, ``rerank_mode`` "blend" or
  "mscmat", ``rerank_weight``; why blend is the default is documented there); ``mscmat_matrix`` and
  ``reranked_recall`` measure re-ranking with the exact ``msa.metrics.recall_at_k`` protocol
  (bench/rerank.py).
- ``msa.retrieval.constants``: the defaults the command line shares with the library (no torch).

Models come from ``msa.runtime.resolver`` (re-exported here): ``resolve_model(source)`` turns a
checkpoint directory or an MLflow model URI into a ``ResolvedModel``.

Names are imported lazily, so ``msa.retrieval.constants`` can be read (by the ``msa`` parser) without
loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "msa.retrieval.constants": (
        "RerankMode", "RERANK_MODES", "DEFAULT_RERANK_MODE", "DEFAULT_RERANK_WEIGHT", "DEFAULT_K",
        "DEFAULT_INDEX_SPLIT", "DEFAULT_INDEX_BATCH_SIZE",
    ),
    "msa.retrieval.index": (
        "INDEX_FORMAT", "INDEX_FORMAT_VERSION", "META_FILE", "IMAGE_EMB_FILE", "TEXT_EMB_FILE",
        "CAPTION_IMAGE_FILE", "IMAGE_KEYS_FILE", "CAPTIONS_FILE", "PROBE_TEXT", "PROBE_MIN_COSINE",
        "scale_file", "IndexFormatError", "ModelIndexMismatch", "Index", "model_probe", "check_model",
        "embed_for_index", "build_index",
    ),
    "msa.retrieval.search": (
        "Hit", "search_text", "search_image", "combine_scores", "mscmat_matrix", "rerank_similarities",
        "reranked_recall",
    ),
    "msa.runtime.resolver": ("ResolvedModel", "resolve_model"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # what the lazy table resolves to, for type checkers and editors
    from msa.retrieval.constants import (  # noqa: F401
        DEFAULT_INDEX_BATCH_SIZE,
        DEFAULT_INDEX_SPLIT,
        DEFAULT_K,
        DEFAULT_RERANK_MODE,
        DEFAULT_RERANK_WEIGHT,
        RERANK_MODES,
        RerankMode,
    )
    from msa.retrieval.index import (  # noqa: F401
        CAPTION_IMAGE_FILE,
        CAPTIONS_FILE,
        IMAGE_EMB_FILE,
        IMAGE_KEYS_FILE,
        INDEX_FORMAT,
        INDEX_FORMAT_VERSION,
        META_FILE,
        PROBE_MIN_COSINE,
        PROBE_TEXT,
        TEXT_EMB_FILE,
        Index,
        IndexFormatError,
        ModelIndexMismatch,
        build_index,
        check_model,
        embed_for_index,
        model_probe,
        scale_file,
    )
    from msa.retrieval.search import (  # noqa: F401
        Hit,
        combine_scores,
        mscmat_matrix,
        rerank_similarities,
        reranked_recall,
        search_image,
        search_text,
    )
    from msa.runtime.resolver import ResolvedModel, resolve_model  # noqa: F401
