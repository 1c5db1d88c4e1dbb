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
