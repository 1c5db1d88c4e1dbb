"""The retrieval index at a million images: build time, resident memory, query latency, ANN recall.

Writes a synthetic index with ``msa.retrieval.IndexWriter`` (the writer ``msa index`` uses): N image
embeddings (clustered unit vectors, ``msa.retrieval.clustered_unit_vectors``, stored float16), K scale
vectors per image (uniform noise, only read back), no captions, and a faiss IVF index over the
embeddings. Then, each in a fresh process that loads the index and searches it (as ``msa search``
does, minus the model), it measures single-query top-10 latency and resident memory for the exact
backend (the baseline) and the ANN backend at several probe counts, plus fetching the top-R
candidates' scale rows for MSCMAT re-ranking. ANN recall@10 is measured against a batched float32
brute force over the stored vectors computed here, independently of the library's exact backend
(whose own agreement with it is printed too). Ratio printed: exact p50 / ANN p50.

    nice -n 10 .venv/bin/python bench/bench_index.py            # 1M x 512, paper-preset scales (~11 GB disk)
    nice -n 10 .venv/bin/python bench/bench_index.py --small    # 20k vectors, a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

WRITE_CHUNK = 65_536
QUERY_PART = 1_000_000  # clustered_unit_vectors part for the queries: no data chunk uses it
RSS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def rss_mib() -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in RSS_FIELDS if k in fields}


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1e3, q))


# ------------------------------------------------------------------------------------------- build


def build(out: Path, args: argparse.Namespace) -> dict:
    from msa.retrieval import IndexWriter, clustered_unit_vectors

    scale_dims = [int(c) for c in args.scale_dims.split(",") if c]
    rng = np.random.default_rng(args.seed)
    noise = [rng.random((WRITE_CHUNK, c), dtype=np.float32) for c in scale_dims]  # only ever read back
    started = time.perf_counter()
    with IndexWriter(out, args.n, 0, args.dim, scale_dims, source="synthetic") as writer:
        for part, start in enumerate(range(0, args.n, WRITE_CHUNK)):
            rows = min(WRITE_CHUNK, args.n - start)
            writer.add_images(clustered_unit_vectors(rows, args.dim, args.clusters, args.spread, args.seed, part),
                              [block[:rows] for block in noise], [f"synth_{i:07d}" for i in range(start, start + rows)])
        written = time.perf_counter() - started
        writer.commit({"data": {"uri": "synthetic", "split": "test", "clusters": args.clusters,
                                "spread": args.spread}}, ann="always", progress=True)
    meta = json.loads((out / "meta.json").read_text())
    return {"write_s": written, "ann": meta["ann"]["image"], "total_s": time.perf_counter() - started,
            "bytes": {p.name: p.stat().st_size for p in out.iterdir()}}


def brute_force_top10(index_dir: Path, queries: np.ndarray) -> np.ndarray:
    """[Q, 10] rows of the float32 brute force over the stored float16 vectors, batched over queries."""
    vectors = np.load(index_dir / "image_emb.npy", mmap_mode="r")
    q = torch.from_numpy(queries)
    best_s, best_i = torch.full((len(q), 10), -math.inf), torch.zeros((len(q), 10), dtype=torch.long)
    for start in range(0, len(vectors), WRITE_CHUNK):
        scores = q @ torch.from_numpy(np.asarray(vectors[start : start + WRITE_CHUNK], dtype=np.float32)).T
        s, i = torch.cat([best_s, scores], 1), torch.cat([best_i, torch.arange(start, start + scores.shape[1])
                                                          .expand(len(q), -1)], 1)
        best_s, top = s.topk(10, dim=1)
        best_i = i.gather(1, top)
    return best_i.numpy()


# ----------------------------------------------------------------------------- measuring process


def measure(args: argparse.Namespace) -> None:
    """In a fresh process: load the index, time single queries with one backend, report RSS (JSON)."""
    from msa.retrieval import Index, nearest

    before = rss_mib()
    started = time.perf_counter()
    index = Index.load(args.measure)
    load_s = time.perf_counter() - started
    loaded = rss_mib()
    queries = torch.from_numpy(np.load(args.queries))
    out = {"backend": args.backend, "load_s": load_s, "rss_after_imports": before, "rss_after_load": loaded,
           "threads": torch.get_num_threads(), "runs": []}
    for probes in [int(p) for p in args.probes.split(",")] if args.backend == "ann" else [0]:
        options = {"backend": args.backend, **({"probes": probes} if probes else {})}
        for query in queries[:3]:  # warm-up: first touch of the pages, faiss's lazy set-up
            nearest(index, "image", query, 10, **options)
        seconds, rows = [], []
        for query in queries:
            t = time.perf_counter()
            _, found = nearest(index, "image", query, 10, **options)
            seconds.append(time.perf_counter() - t)
            rows.append(found.tolist() + [-1] * (10 - len(found)))
        out["runs"].append({"probes": probes or None, "p50_ms": percentile_ms(seconds, 50),
                            "p99_ms": percentile_ms(seconds, 99), "queries": len(seconds), "rows": rows})
    out["rss_after_search"] = rss_mib()
    if index.image_scales and args.backend == "ann":
        seconds = []
        for query in queries[:200]:
            _, found = nearest(index, "image", query, args.rerank)
            t = time.perf_counter()
            index.scale_rows(found, "cpu")
            seconds.append(time.perf_counter() - t)
        out["fetch"] = {"rows": args.rerank, "p50_ms": percentile_ms(seconds, 50), "p99_ms": percentile_ms(seconds, 99),
                        "queries": len(seconds)}
        out["rss_after_fetch"] = rss_mib()
    print(json.dumps(out))


def run_measure(index_dir: Path, queries: Path, backend: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--measure", str(index_dir), "--queries", str(queries), "--backend",
               backend, "--probes", args.probes, "--rerank", str(args.rerank)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def recall(rows: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(r) & set(t.tolist())) / 10 for r, t in zip(rows, truth)]))


def rss_line(label: str, rss: dict[str, float]) -> str:
    return (f"  {label:<22} RSS {rss['VmRSS']:8.0f} MiB (anonymous {rss['RssAnon']:7.0f}, file-backed "
            f"{rss['RssFile']:7.0f}), peak {rss['VmHWM']:.0f} MiB")


# ------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="image embeddings (default 1,000,000)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    parser.add_argument("--clusters", type=int, default=None, help="cluster centres (default n / 1000)")
    parser.add_argument("--spread", type=float, default=1.5, help="noise norm around a centre (default 1.5)")
    parser.add_argument("--scale-dims", default="256,512,1024,2048",
                        help="scale vector widths, comma-separated, '' for none (default: the paper preset's)")
    parser.add_argument("--exact-queries", type=int, default=100, help="queries timed with exact search")
    parser.add_argument("--ann-queries", type=int, default=1000, help="queries timed with ANN search")
    parser.add_argument("--probes", default="1,4,16,32,64", help="IVF probe counts to sweep")
    parser.add_argument("--rerank", type=int, default=100, help="candidates whose scale rows are fetched")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="directory for the index (default: a temp dir, removed)")
    parser.add_argument("--small", action="store_true", help="20,000 vectors, small scales: a smoke run")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--queries", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args)
    if args.small:
        args.n, args.scale_dims, args.exact_queries, args.ann_queries = 20_000, "16,32", 50, 200
    args.clusters = args.clusters or max(1, args.n // 1000)

    from msa.retrieval import DEFAULT_ANN_PROBES, clustered_unit_vectors

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-index-"))
    index_dir = work / "index"
    try:
        print(f"synthetic index: {args.n:,} x {args.dim} unit vectors around {args.clusters:,} centres (spread "
              f"{args.spread}), scale widths [{args.scale_dims}], float16, in {index_dir}", flush=True)
        built = build(index_dir, args)
        gib = {name: size / 2**30 for name, size in built["bytes"].items()}
        ann = built["ann"]
        print(f"build: vectors written in {built['write_s']:.1f} s, {ann['kind']} trained and filled in "
              f"{ann['build_seconds']:.1f} s; {built['total_s']:.1f} s in all", flush=True)
        print(f"  on disk: embeddings {gib['image_emb.npy']:.2f} GiB, ANN index {gib['image_emb.ivf']:.2f} GiB, "
              f"scale vectors {sum(v for k, v in gib.items() if k.startswith('image_scales')):.2f} GiB")

        queries = clustered_unit_vectors(max(args.exact_queries, args.ann_queries), args.dim, args.clusters,
                                         args.spread, args.seed, QUERY_PART)
        query_file = work / "queries.npy"
        np.save(query_file, queries)
        started = time.perf_counter()
        truth = brute_force_top10(index_dir, queries)
        print(f"reference: batched float32 brute force over {len(queries)} queries in "
              f"{time.perf_counter() - started:.1f} s", flush=True)

        np.save(work / "exact-queries.npy", queries[: args.exact_queries])
        exact = run_measure(index_dir, work / "exact-queries.npy", "exact", args)
        np.save(query_file, queries[: args.ann_queries])
        approx = run_measure(index_dir, query_file, "ann", args)

        print(f"search (single query, top 10, {exact['threads']} threads; each backend in a fresh process that "
              f"loads the index, load {exact['load_s']:.2f} s):")
        e = exact["runs"][0]
        print(f"  exact           p50 {e['p50_ms']:8.2f} ms  p99 {e['p99_ms']:8.2f} ms  ({e['queries']} queries, "
              f"recall@10 vs reference {recall(e['rows'], truth):.4f})")
        default = None
        for run in approx["runs"]:
            r = recall(run["rows"], truth)
            mark = "  <- default" if run["probes"] == DEFAULT_ANN_PROBES else ""
            if run["probes"] == DEFAULT_ANN_PROBES:
                default = run
            print(f"  ann probes {run['probes']:<4} p50 {run['p50_ms']:8.2f} ms  p99 {run['p99_ms']:8.2f} ms  "
                  f"({run['queries']} queries, recall@10 {r:.4f}){mark}")
        if default:
            print(f"  ratio exact p50 / ann p50 (probes {DEFAULT_ANN_PROBES}): {e['p50_ms'] / default['p50_ms']:.0f}x")
        if "fetch" in approx:
            f = approx["fetch"]
            print(f"  re-rank fetch of {f['rows']} candidates' scale rows, {f['queries']} queries (memmap, rows from "
                  f"the page cache or disk): p50 {f['p50_ms']:.2f} ms  p99 {f['p99_ms']:.2f} ms")
        print("resident memory:")
        for label, m in (("exact", exact), ("ann", approx)):
            print(rss_line(f"{label}: after imports", m["rss_after_imports"]))
            print(rss_line(f"{label}: after load", m["rss_after_load"]))
            print(rss_line(f"{label}: after searching", m["rss_after_search"]))
            if "rss_after_fetch" in m:
                print(rss_line(f"{label}: after fetches", m["rss_after_fetch"]))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
