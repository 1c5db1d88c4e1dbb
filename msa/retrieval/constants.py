"""Retrieval defaults shared by the library and the command line; imports nothing heavy.

``flows/cli_retrieval.py`` builds its parser from these without importing torch, numpy or the
rest of ``msa.retrieval``; ``msa.retrieval.search`` and ``msa.retrieval.index`` use the same values.
"""

from __future__ import annotations

from typing import Literal

RerankMode = Literal["blend", "mscmat"]
RERANK_MODES: tuple[str, ...] = ("blend", "mscmat")
DEFAULT_RERANK_MODE: RerankMode = "blend"
DEFAULT_RERANK_WEIGHT = 1.0
DEFAULT_K = 10  # results per query

DEFAULT_INDEX_SPLIT = "test"
DEFAULT_INDEX_BATCH_SIZE = 128  # images / captions per forward pass when building an index

# Global-embedding search (msa.retrieval.backends): "exact" scans every vector, "ann" asks the faiss IVF
# index stored with the index, "auto" uses the ANN index where the index has one for the side searched.
SearchBackend = Literal["auto", "exact", "ann"]
SEARCH_BACKENDS: tuple[str, ...] = ("auto", "exact", "ann")
DEFAULT_SEARCH_BACKEND: SearchBackend = "auto"
# Which sides get an ANN index when an index is built: "auto" from ANN_AUTO_MIN_VECTORS vectors on.
ANN_MODES: tuple[str, ...] = ("auto", "always", "never")
DEFAULT_ANN_MODE = "auto"
ANN_AUTO_MIN_VECTORS = 100_000
# IVF lists probed per query; bench/bench_index.py measures recall@10 against exact search at 1M vectors.
DEFAULT_ANN_PROBES = 32
