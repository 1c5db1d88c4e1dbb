"""Retrieval over a prebuilt index: embed a shard split once, then answer text or image queries.

- ``msa.retrieval.index``: the index directory format (documented there: float16, memory-mapped),
  ``Index.load`` with validation (``IndexFormatError`` names the bad file) and ``check_model``, which
  refuses a model other than the one the index was built with (``ModelIndexMismatch``).
- ``msa.retrieval.build``: ``IndexWriter`` (streams rows into a temp dir, renamed into place) and
  ``build_index``, which embeds a shard split into one.
- ``msa.retrieval.backends``: exact chunked search and the faiss IVF index (why faiss: there).
- ``msa.retrieval.search``: ``search_text`` / ``search_image`` rank by cosine of the global embeddings
  (``nearest``: exact or ANN, ``backend``) and optionally re-rank the top candidates with MSCMAT
  (``rerank``, ``rerank_mode`` "blend" or "mscmat", ``rerank_weight``; why blend is the default is
  documented there); ``mscmat_matrix`` and ``reranked_recall`` measure re-ranking with the exact
  ``msa.metrics.recall_at_k`` protocol (bench/rerank.py).
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
        "DEFAULT_INDEX_SPLIT", "DEFAULT_INDEX_BATCH_SIZE", "SearchBackend", "SEARCH_BACKENDS",
        "DEFAULT_SEARCH_BACKEND", "ANN_MODES", "DEFAULT_ANN_MODE", "ANN_AUTO_MIN_VECTORS", "DEFAULT_ANN_PROBES",
    ),
    "msa.retrieval.index": (
        "INDEX_FORMAT", "INDEX_FORMAT_VERSION", "META_FILE", "IMAGE_EMB_FILE", "TEXT_EMB_FILE",
        "CAPTION_IMAGE_FILE", "IMAGE_KEYS_FILE", "CAPTIONS_FILE", "PROBE_TEXT", "PROBE_MIN_COSINE",
        "VECTOR_DTYPE", "SIDES", "ANN_FILES", "scale_file", "IndexFormatError", "ModelIndexMismatch", "Index",
        "model_probe", "check_model",
    ),
    "msa.retrieval.build": ("IndexWriter", "wants_ann", "embed_for_index", "build_index"),
    "msa.retrieval.backends": (
        "exact_scores", "build_ivf", "load_ivf", "ivf_search", "ivf_lists", "clustered_unit_vectors",
    ),
    "msa.retrieval.search": (
        "Hit", "nearest", "search_text", "search_image", "combine_scores", "mscmat_matrix", "rerank_similarities",
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
    from msa.retrieval.backends import (  # noqa: F401
        build_ivf,
        clustered_unit_vectors,
        exact_scores,
        ivf_lists,
        ivf_search,
        load_ivf,
    )
    from msa.retrieval.build import IndexWriter, build_index, embed_for_index, wants_ann  # noqa: F401
    from msa.retrieval.constants import (  # noqa: F401
        ANN_AUTO_MIN_VECTORS,
        ANN_MODES,
        DEFAULT_ANN_MODE,
        DEFAULT_ANN_PROBES,
        DEFAULT_INDEX_BATCH_SIZE,
        DEFAULT_INDEX_SPLIT,
        DEFAULT_K,
        DEFAULT_RERANK_MODE,
        DEFAULT_RERANK_WEIGHT,
        DEFAULT_SEARCH_BACKEND,
        RERANK_MODES,
        SEARCH_BACKENDS,
        RerankMode,
        SearchBackend,
    )
    from msa.retrieval.index import (  # noqa: F401
        ANN_FILES,
        CAPTION_IMAGE_FILE,
        CAPTIONS_FILE,
        IMAGE_EMB_FILE,
        IMAGE_KEYS_FILE,
        INDEX_FORMAT,
        INDEX_FORMAT_VERSION,
        META_FILE,
        PROBE_MIN_COSINE,
        PROBE_TEXT,
        SIDES,
        TEXT_EMB_FILE,
        VECTOR_DTYPE,
        Index,
        IndexFormatError,
        ModelIndexMismatch,
        check_model,
        model_probe,
        scale_file,
    )
    from msa.retrieval.search import (  # noqa: F401
        Hit,
        combine_scores,
        mscmat_matrix,
        nearest,
        rerank_similarities,
        reranked_recall,
        search_image,
        search_text,
    )
    from msa.runtime.resolver import ResolvedModel, resolve_model  # noqa: F401
