"""The ``loader`` section: the real ``msa.data.PairBatches`` input pipeline over a synthetic shard set.

Measured with each ``--loader-workers`` count (default 0 and 1), in pairs/s and pairs per CPU-second
("per core"), to size the CPU count per GPU against the train section's measured step.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import torch

from msa.bench.common import fmt, log, table
from msa.bench.context import Bench
from msa.bench.timing import cpu_seconds


def section_loader(b: Bench) -> dict[str, Any]:
    from msa.data import ImageTransform, PairBatches, pair_loader

    a = b.args
    corpus = b.corpus()
    bs = a.loader_batch_size
    rows = []
    for workers in a.loader_workers:
        log(f"loader: {workers} workers, {a.loader_batches} batches of {bs}")
        dataset = PairBatches(corpus["train_urls"], transform=ImageTransform(b.cfg.image.size),
                              tokenizer=b.tokenizer, max_tokens=b.seq, batch_size=bs,
                              steps_per_epoch=a.loader_batches, seed=0)
        loader = pair_loader(dataset, num_workers=workers)
        cpu0 = cpu_seconds(resource.RUSAGE_SELF)
        child0 = cpu_seconds(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        it = iter(loader)
        first = next(it)
        t_first = time.perf_counter() - t0
        n = 1
        for _ in it:
            n += 1
        elapsed = time.perf_counter() - t0
        main_cpu = cpu_seconds(resource.RUSAGE_SELF) - cpu0
        del it, first  # shuts the worker down and reaps it: its CPU time is in RUSAGE_CHILDREN now
        worker_cpu = cpu_seconds(resource.RUSAGE_CHILDREN) - child0
        loader = dataset = None
        pairs = n * bs
        rows.append({
            "workers": workers, "batches": n, "pairs": pairs, "s": elapsed, "first_batch_s": t_first,
            "pairs_per_s": pairs / elapsed, "images_per_s": pairs / elapsed * corpus["train_images"]
            / corpus["train_pairs"],
            "main_cpu_s": main_cpu, "worker_cpu_s": worker_cpu,
            "pairs_per_cpu_s": pairs / max(main_cpu + worker_cpu, 1e-9),
        })
    result: dict[str, Any] = {"rows": rows, "batch_size": bs, "image_px": corpus["image_px"],
                              "model_image_size": b.cfg.image.size, "corpus_build_s": corpus["build_s"],
                              "threads": torch.get_num_threads()}
    per_core = max(r["pairs_per_cpu_s"] for r in rows)
    result["pairs_per_core_s"] = per_core
    train = b.results.get("train")
    if train:
        result["cores_per_device"] = {r["batch_size"]: r["pairs_per_s"] / per_core
                                      for r in train["rows"] if r.get("status") == "ok"}
    headers = ["workers", "batches", "pairs", "s", "first batch s", "pairs/s", "images/s", "main CPU s",
               "worker CPU s", "pairs per CPU-s"]
    body = [[r["workers"], r["batches"], r["pairs"], r["s"], r["first_batch_s"], r["pairs_per_s"],
             r["images_per_s"], r["main_cpu_s"], r["worker_cpu_s"], r["pairs_per_cpu_s"]] for r in rows]
    notes = [f"msa.data.PairBatches + pair_loader over {corpus['train_images']} synthetic {corpus['image_px']}px "
             f"jpg images x 5 captions (cycled), batch {bs}, resize to {b.cfg.image.size}, tokenise {b.seq} tokens",
             "pairs per CPU-s = pairs / (main + worker CPU seconds): the per-core rate; each image is "
             "decoded once per 5 pairs",
             f"first batch s includes worker start and the shuffle buffer filling (buffer {2000} pairs)"]
    if train and result.get("cores_per_device"):
        sizing = ", ".join(f"B={k}: {fmt(v)}" for k, v in result["cores_per_device"].items())
        notes.append(f"loader cores needed to feed this run's measured train step ({b.device.type}): {sizing}")
    print(table("input pipeline (loader alone)", headers, body, notes))
    return result
