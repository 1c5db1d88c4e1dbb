"""How the global embeddings are searched: exactly, chunk by chunk over the memory-mapped float16
matrix, or approximately with a faiss IVF index stored beside it.

Why faiss (faiss-cpu), and an IVF index with float16 codes (``IVF{nlist},SQfp16``), not HNSW: the
build. On the 2-core machine this was chosen on, usearch 2.26's HNSW (float16, connectivity 16,
expansion_add 64) inserted 200k 512-d clustered vectors in 115 s (about 10 minutes for a million,
more with the larger graphs recall needs: 0.986 recall@10 at expansion_search 256 on those 200k),
while faiss trains and fills IVF2000 over a million in about 2 minutes. The IVF codes are the very
float16 rows the index stores (not residuals), so its scores are exact search's cosines; it loads
with ``IO_FLAG_MMAP`` (the inverted lists stay in the page cache, not in process memory); recall is
traded for speed at query time by the number of lists probed, without a rebuild; and faiss-gpu runs
the same index types. Its weak spot: data with many more natural clusters than lists scatters the
clusters k-means leaves without a list over many lists (bench/bench_index.py shows both cases).

Exact search never holds more than one chunk of the matrix in float32; its cost is a pass over the
matrix per query (about 2 bytes x N x D read), which is what the ANN index avoids for large N.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.distributed import progress_bar

EXACT_CHUNK_ROWS = 16_384  # rows upcast to float32 at a time (32 MiB at D=512)
ANN_ADD_CHUNK_ROWS = 65_536  # rows handed to faiss per add() (float32, 128 MiB at D=512)
IVF_POINTS_PER_LIST = 39  # faiss warns below 39 training points per list
IVF_TRAIN_POINTS_PER_LIST = 256  # the k-means sample (faiss's default); 64 missed clusters, costing recall
IVF_SEED = 0


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor view of a (read-only, memory-mapped) array; torch warns on read-only arrays, and these
    views are only ever read (copied or multiplied), never written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def exact_scores(vectors: np.ndarray, query: torch.Tensor, chunk_rows: int = EXACT_CHUNK_ROWS) -> torch.Tensor:
    """``vectors @ query``: [N] float32 on ``query``'s device, for float16 ``vectors`` [N, D] (a memmap),
    upcast ``chunk_rows`` rows at a time into one reused float32 buffer."""
    n, dim = vectors.shape
    out = torch.empty(n, dtype=torch.float32, device=query.device)
    buffer = torch.empty(min(chunk_rows, n), dim, dtype=torch.float32)
    for start in range(0, n, chunk_rows):
        rows = as_tensor(vectors[start : start + chunk_rows])
        block = buffer[: rows.shape[0]]
        block.copy_(rows)
        torch.mv(block.to(query.device), query, out=out[start : start + rows.shape[0]])
    return out


# ------------------------------------------------------------------------------------------ faiss IVF


def ivf_lists(n: int) -> int:
    """Number of inverted lists for n vectors: about 2 sqrt(n), at least 39 training points per list."""
    return max(1, min(round(2 * math.sqrt(n)), n // IVF_POINTS_PER_LIST))


def build_ivf(vectors: np.ndarray, path: Path, progress: bool = False, desc: str = "ANN index") -> dict[str, Any]:
    """Train and fill an ``IVF{nlist},SQfp16`` inner-product index over ``vectors`` [N, D] (a memmap), read
    in chunks, and write it to ``path``. Returns what meta.json records about it.

    Memory: the k-means sample (up to 256 rows per list, float32: 1 GiB at N=1M, D=512) while training,
    then the codes (N x D float16) until written."""
    import faiss

    started = time.perf_counter()
    n, dim = vectors.shape
    nlist = ivf_lists(n)
    kind = f"IVF{nlist},SQfp16"
    index = faiss.index_factory(dim, kind, faiss.METRIC_INNER_PRODUCT)
    index.by_residual = False  # code the vectors themselves, not their offsets from the list centroid: the
    # codes are then exactly the stored float16 rows, and ANN scores equal exact search's
    index.cp.spherical = True  # unit-norm centroids: lists by cosine, as the vectors are searched
    index.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
    index.cp.seed = IVF_SEED
    index.cp.min_points_per_centroid = 1  # ivf_lists keeps 39 per list where n allows; tiny n gets 1 list
    sample = np.sort(np.random.default_rng(IVF_SEED).choice(n, min(n, nlist * IVF_TRAIN_POINTS_PER_LIST),
                                                            replace=False))
    index.train(np.asarray(vectors[sample], dtype=np.float32))
    with progress_bar(n, desc, progress, unit="vec") as bar:
        for start in range(0, n, ANN_ADD_CHUNK_ROWS):
            chunk = np.asarray(vectors[start : start + ANN_ADD_CHUNK_ROWS], dtype=np.float32)
            index.add(chunk)
            bar.update(len(chunk))
    faiss.write_index(index, str(path))
    return {
        "file": path.name,
        "library": f"faiss {faiss.__version__}",
        "kind": kind,
        "lists": nlist,
        "build_seconds": round(time.perf_counter() - started, 3),
    }


def load_ivf(path: Path, count: int, dim: int):
    """The IVF index at ``path``, memory-mapped; ``ValueError`` naming the file unless it holds
    ``count`` vectors of dimension ``dim``."""
    import faiss

    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: unreadable or corrupt faiss index ({first})") from e
    if index.ntotal != count or index.d != dim or not hasattr(index, "nlist"):
        raise ValueError(f"{path}: a faiss index of {index.ntotal} x {index.d} vectors, expected an IVF index "
                         f"of {count} x {dim} (meta.json)")
    return index


def ivf_search(index, query: torch.Tensor, window: int, probes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, row indices) of the ``window`` best rows found probing ``probes`` lists, best first, on
    ``query``'s device; fewer when the probed lists hold fewer rows."""
    import faiss

    params = faiss.SearchParametersIVF(nprobe=min(probes, index.nlist))
    scores, ids = index.search(query.detach().float().cpu().numpy()[None], window, params=params)
    found = ids[0] >= 0
    return (torch.from_numpy(scores[0][found]).to(query.device),
            torch.from_numpy(ids[0][found]).to(query.device))


# ------------------------------------------------------------------------------ synthetic vectors


def clustered_unit_vectors(n: int, dim: int, clusters: int, spread: float = 1.0, seed: int = 0,
                           part: int = 0) -> np.ndarray:
    """[n, dim] float32 unit vectors around ``clusters`` random unit centroids (fixed by ``seed``), each
    a centroid plus Gaussian noise of norm about ``spread`` (1.0: cosine about 0.7 to its centroid),
    renormalised; ``part`` draws an independent batch around the same centroids (for chunked writes
    and for queries). For benchmarks and tests of the search backends."""
    centroids = np.random.default_rng(seed).standard_normal((clusters, dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, part + 1])
    vectors = centroids[rng.integers(0, clusters, n)]
    vectors += rng.standard_normal((n, dim), dtype=np.float32) * (spread / math.sqrt(dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors
