"""Performance benchmark: ``python -m msa.bench`` (``--help`` explains every option).

Sections (``--sections``, default all four):

* ``train``  one full optimisation step (both towers, MSCMAT, every loss, backward, AdamW) on random
  inputs, compute only: ms/step, pairs/s, peak memory, model FLOPs (``FlopCounterMode``, fwd+bwd) and
  MFU against the measured matrix-multiply rate of the device (bf16 on a GPU, fp32 on the CPU).
* ``mscmat`` the library MSCMAT forward + backward against a naive pair-by-pair MSCMAT kept here (never
  in the library) as the in-run baseline; the two are first shown to agree (max |diff| printed).
* ``eval``   RSICD-size retrieval evaluation (1,093 images, 5,465 captions): embed each image and each
  caption once in large batches, rank on the device with ``msa.metrics.recall_at_k``; plus the library's
  end-to-end ``embed_split`` (shard reading and decoding included) over a small synthetic shard set.
* ``loader`` the real ``msa.data.PairBatches`` input pipeline over a synthetic shard set, with 0 and 1
  loader workers, in pairs/s and pairs per CPU-second ("per core"), to size the CPU count per GPU.

GPU timings use CUDA events and ``torch.cuda.max_memory_allocated``. On the CPU, wall-clock timing is
used and memory is the peak of live tensor bytes seen by a dispatch-mode tracker during one extra,
untimed call (CPU PyTorch keeps no allocator statistics); it says so wherever it is printed.
The reference figures (the authors' code, fp32, one H100) are printed for orientation and compared only
with a GPU run; targets are evaluated only on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

SECTIONS = ("train", "mscmat", "eval", "loader")
GIB = 2**30
RSICD_TEST_IMAGES, RSICD_TEST_CAPTIONS = 1093, 5465

# Authors' implementation on one H100, fp32 (from the issue). GPU numbers: never compared with a CPU run.
REFERENCE_LABEL = "reference (H100, authors' code, fp32)"
REFERENCE = {
    "train": {32: {"ms": 115.6, "pairs_per_s": 277.0, "mem_gib": 6.9}},
    "encoders_ms": {32: 68.0},
    "mscmat": {32: {"ms": 38.0}, 64: {"ms": 136.0, "mem_gib": 10.2}, 128: {"ms": 567.0, "mem_gib": 33.6}},
    "eval": {"per_caption_ms": 14.7, "total_s": 81.0},
}
TARGETS = {
    "train_b32_x_ref": 2.0,  # paper preset, B=32: at least 2x the reference's pairs/s
    "train_b256_bf16_x_ref": 15.0,  # B >= 256 with bf16: at least 15x
    "mscmat_b128_naive_fraction": 1 / 20,  # fwd+bwd at B=128 under 1/20 of the naive time ...
    "mscmat_b128_gib": 2.0,  # ... and under 2 GiB
    "eval_s": 3.0,  # RSICD-size evaluation under 3 s
}

# --tiny: CPU smoke sizes (seconds on two cores); every number says it is scaled down.
TINY = {
    "batch_sizes": (4, 8),
    "steps": 2,
    "warmup": 1,
    "overrides": ["image.size=32"],
    "eval_images": 32,
    "eval_captions": 160,
    "eval_batch_size": 32,
    "e2e_images": 8,
    "loader_images": 12,
    "loader_batches": 6,
    "loader_batch_size": 8,
    "matmul_n": 256,
}


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> list[float]:
    """Milliseconds per call of ``fn`` after ``warmup`` untimed calls: CUDA events on a GPU, else wall clock."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def wall_s(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while active and still alive (CPU stand-in for max_memory_allocated).

    Every op output whose storage is new (not a view of, or written into, one of the op's inputs) is
    counted until its storage is freed. Tensors that existed before (weights, inputs) are not counted,
    nor are buffers private to a fused kernel. It slows every op down: use it on an untimed call only.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: dict[int, tuple[Any, int]] = {}
        self.current = self.peak = 0

    def _sweep(self) -> None:
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in inputs:
                continue
            if ptr in self.live:
                if not self.live[ptr][0].expired():
                    continue
                self.current -= self.live.pop(ptr)[1]
            self.live[ptr] = (self._ref(storage), storage.nbytes())
            self.current += storage.nbytes()
            if self.current > self.peak:  # stale entries only over-count, so sweep before a new peak
                self._sweep()
                self.peak = max(self.peak, self.current)
        return out


@dataclasses.dataclass
class MemoryReading:
    bytes: int
    kind: str  # what the number is, printed next to it


def measure_peak(fn: Callable[[], Any], device: torch.device) -> MemoryReading:
    """Peak extra memory of one call of ``fn`` over what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return MemoryReading(torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated over baseline")
    with LiveTensorBytes() as tracker:
        fn()
    return MemoryReading(tracker.peak, "cpu live tensors, dispatch-tracked")


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def maxrss_gib() -> float:
    """This process's resident-set high-water mark (Linux: KiB units)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------ matmul peak


def measure_matmul_tflops(device: torch.device, n: int | None = None) -> dict[str, Any]:
    """Achieved TFLOP/s of a large square matmul: bf16 on a GPU (the card's tensor-core rate), fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    once = wall_s(lambda: a @ b, device)[0]
    reps = max(3, min(50, int(0.5 / max(once, 1e-6))))
    times = time_calls(lambda: a @ b, device, steps=reps, warmup=2)
    ms = statistics.median(times)
    return {"tflops": 2 * n**3 / (ms * 1e-3) / 1e12, "dtype": str(dtype).removeprefix("torch."), "n": n,
            "source": "measured"}


# ---------------------------------------------------------------------------- naive MSCMAT baseline


class NaivePairMSCMAT(nn.Module):
    """The reference's pair-by-pair MSCMAT, kept in the benchmark only (the in-run baseline).

    Like the authors' code it builds every (image i, caption j) pair by concatenation in a Python loop
    (per image: the image's query broadcast against a copy of every caption's 30 tokens), applies LN_B to
    each pair's copy and runs one ``nn.MultiheadAttention`` over the B^2 pairs, so the caption key/value
    projections are recomputed B times and memory grows as B^2 * tokens * D. The loop is per image, with
    the captions broadcast, rather than a Python call per (i, j): B^2 tiny Python-level ops would make
    the baseline slower than the reference's measured, compute-bound B^2 scaling and flatter the library.
    Weights are copied from a library ``MSCMAT``; ``agreement`` checks the two give the same scores.
    """

    def __init__(self, library: nn.Module):
        super().__init__()
        d = library.ln_query.normalized_shape[0]
        ref = library.scales[0].query_proj.weight
        kw = {"device": ref.device, "dtype": ref.dtype}  # built in the library's dtype: copies lose nothing
        self.query_proj = nn.ModuleList()
        self.attn = nn.ModuleList()
        self.match_head = nn.ModuleList()
        with torch.no_grad():
            for scale in library.scales:
                fc = nn.Linear(scale.query_proj.in_features, d, **kw)
                fc.load_state_dict(scale.query_proj.state_dict())
                mha = nn.MultiheadAttention(d, scale.num_heads, batch_first=True, **kw)
                mha.in_proj_weight.copy_(scale.attn_in_weight)
                mha.in_proj_bias.copy_(scale.attn_in_bias)
                mha.out_proj.weight.copy_(scale.attn_out.weight)
                mha.out_proj.bias.copy_(scale.attn_out.bias)
                head = nn.Linear(d, 1, **kw)
                head.load_state_dict(scale.match_head.state_dict())
                self.query_proj.append(fc)
                self.attn.append(mha)
                self.match_head.append(head)
            self.ln_query = nn.LayerNorm(d, eps=library.ln_query.eps, **kw)
            self.ln_query.load_state_dict(library.ln_query.state_dict())
            self.ln_tokens = nn.LayerNorm(d, eps=library.ln_tokens.eps, **kw)
            self.ln_tokens.load_state_dict(library.ln_tokens.state_dict())

    def forward(self, scale_feats: Sequence[Tensor], tokens: Tensor, cls: Tensor) -> Tensor:
        n_img, n_cap = scale_feats[0].shape[0], tokens.shape[0]
        scores = []
        for fc, mha, head, feats in zip(self.query_proj, self.attn, self.match_head, scale_feats):
            q = fc(feats)
            pair_q, pair_tokens, pair_cls = [], [], []
            for i in range(n_img):  # every (i, j) pair gets its own copy of caption j's tokens
                pair_q.append(q[i].expand(n_cap, -1))
                pair_tokens.append(tokens)
                pair_cls.append(cls)
            q_p, t_p, c_p = torch.cat(pair_q), torch.cat(pair_tokens), torch.cat(pair_cls)
            t_norm = self.ln_tokens(t_p)
            attended = mha(self.ln_query(q_p)[:, None], t_norm, t_norm, need_weights=False)[0][:, 0]
            scores.append(head((attended + c_p) * q_p).view(n_img, n_cap))
        return torch.stack(scores).sigmoid()


# ---------------------------------------------------------------------------------------- context


@dataclasses.dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    cfg: Any
    bf16: bool
    channels_last: bool
    results: dict[str, Any]
    _model: nn.Module | None = None
    _corpus: dict[str, Any] | None = None
    _tokenizer: Any = None
    tmp: Path | None = None

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            from msa.model import MSAModel

            log(f"building the {self.cfg.preset} model (random init)")
            torch.manual_seed(0)
            model = MSAModel(self.cfg).to(self.device)
            if self.channels_last:
                model.image.to(memory_format=torch.channels_last)
            self._model = model
        return self._model

    @property
    def seq(self) -> int:
        return self.cfg.text.max_tokens

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from msa.encoders import WeightsUnavailableError, build_tokenizer

            source = self.cfg.text.tokenizer or self.cfg.text.model
            try:
                self._tokenizer = build_tokenizer(source)
            except (WeightsUnavailableError, OSError) as e:
                fallback = "packaged:all-minilm-l6-v2"  # the bert-base-uncased vocabulary, shipped in a package
                log(f"tokenizer {source!r} unavailable ({type(e).__name__}); using {fallback!r}")
                self._tokenizer = build_tokenizer(fallback)
        return self._tokenizer

    def images(self, n: int) -> Tensor:
        size = self.cfg.image.size
        x = torch.randn(n, 3, size, size, device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def captions(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Random token ids shaped like tokenised captions: [CLS] words [SEP] [PAD]..., 8 to max_tokens long."""
        g = torch.Generator().manual_seed(seed)
        vocab = self.model.text.transformer.config.vocab_size
        ids = torch.randint(min(1000, vocab // 2), vocab, (n, self.seq), generator=g)
        lengths = torch.randint(min(8, self.seq), self.seq + 1, (n,), generator=g)
        pos = torch.arange(self.seq)[None]
        mask = (pos < lengths[:, None]).long()
        ids[:, 0] = min(101, vocab - 1)
        ids[torch.arange(n), lengths - 1] = min(102, vocab - 1)
        ids = ids * mask
        return ids.to(self.device), mask.to(self.device)

    def corpus(self) -> dict[str, Any]:
        """A synthetic shard set (train + test splits) at the model's image size, built once per run."""
        if self._corpus is None:
            from shards.manifest import read_manifest
            from shards.synth import generate_corpus
            from shards.writer import write_shards

            a = self.args
            px = a.loader_image_px or self.cfg.image.size
            splits = {"train": a.loader_images, "test": a.e2e_images}
            workers = 1 if self.device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))
            log(f"generating a synthetic corpus {splits} at {px}px")
            t0 = time.perf_counter()
            ann = generate_corpus(self.tmp / "corpus", splits=splits, image_size=px, seed=0, workers=workers)
            uri = str(self.tmp / "shards")
            write_shards(ann, ann.parent / "images", uri, shard_size=max(1, a.loader_images // 4), progress=False)
            manifest = read_manifest(uri)
            self._corpus = {
                "uri": uri,
                "image_px": px,
                "train_urls": manifest.shard_urls("train"),
                "test_urls": manifest.shard_urls("test"),
                "train_images": manifest.splits["train"].images,
                "train_pairs": manifest.splits["train"].captions,
                "test_images": manifest.splits["test"].images,
                "build_s": time.perf_counter() - t0,
            }
        return self._corpus


# ------------------------------------------------------------------------------------ formatting


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.{max(0, digits - 1 - int(math.log10(magnitude)))}f}"
    return f"{value:.{digits}g}"


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = [f"\n== {title}", "  ".join(h.rjust(w) for h, w in zip(headers, widths)), line]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    out += [f"   {n}" for n in notes]
    return "\n".join(out)


def gib(n: int | None) -> float | None:
    return None if n is None else n / GIB


def _comparability(b: Bench) -> str:
    if b.device.type != "cuda":
        return "this is a CPU run: the reference and the targets are GPU figures, not comparable"
    if b.cfg.preset != "paper":
        return f"preset {b.cfg.preset}: the reference ran the paper model, so no ratios are computed"
    return "ratios vs the reference: same model and batch, this GPU vs the authors' H100 (fp32)"


# ------------------------------------------------------------------------------------- train step


def section_train(b: Bench) -> dict[str, Any]:
    from msa.losses import hardest_triplet_loss
    from msa.model import compute_loss
    from msa.train import build_optimizer

    a, device, cfg = b.args, b.device, b.cfg
    eager = b.model
    model = torch.compile(eager) if a.compile else eager
    if a.fused_adamw:
        o = cfg.optim
        optimizer = torch.optim.AdamW(eager.parameters(), lr=o.lr, weight_decay=o.weight_decay,
                                      betas=tuple(o.betas), eps=o.eps, fused=True)
    else:
        optimizer = build_optimizer(eager, cfg.optim)
    eager.train()
    peak = b.results["meta"]["matmul"]["tflops"] * 1e12
    static = sum(p.numel() * p.element_size() for p in eager.parameters())
    rows = []
    for bs in a.batch_sizes:
        log(f"train B={bs}")
        row: dict[str, Any] = {"batch_size": bs, "status": "ok"}
        try:
            images = b.images(bs)
            ids, mask = b.captions(bs, seed=bs)
            image_ids = torch.arange(bs, device=device)

            def step(net=model):
                optimizer.zero_grad(set_to_none=True)
                with b.autocast:
                    out = net(images, ids, mask)
                compute_loss(out, cfg.loss, image_ids)["total"].backward()
                optimizer.step()

            def encoders(net=eager):
                with b.autocast:
                    v, _ = net.encode_image(images)
                    t, _ = net.encode_text(ids, mask)
                negatives = {"negatives": cfg.loss.triplet_negatives} if hasattr(cfg.loss, "triplet_negatives") else {}
                hardest_triplet_loss(v.float(), t.float(), margin=cfg.loss.margin, **negatives).backward()

            # One untimed step counts FLOPs (and, on the CPU, memory): eager model, so compile does not interfere.
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            if device.type == "cpu":
                # AdamW state that exists already; state created inside the step is tracked as live tensors.
                state = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                            for t in s.values() if isinstance(t, Tensor))
                with counter, LiveTensorBytes() as tracker:
                    step(eager)
                row["peak_mem_bytes"] = static + state + tracker.peak
                row["mem_kind"] = "cpu: params + AdamW state + dispatch-tracked live tensors of one step"
            else:
                with counter:
                    step(eager)
            row["flops_per_step"] = counter.get_total_flops()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = time_calls(step, device, a.steps, a.warmup)
            if device.type == "cuda":
                row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
                row["mem_kind"] = "cuda max_memory_allocated (params, grads, AdamW state, activations)"
            ms = statistics.median(times)
            row |= {"ms_per_step": ms, "ms_mean": statistics.fmean(times), "pairs_per_s": bs / ms * 1e3,
                    "achieved_tflops": row["flops_per_step"] / (ms * 1e-3) / 1e12,
                    "mfu": row["flops_per_step"] / (ms * 1e-3) / peak}
            if not a.no_encoders_row:
                optimizer.zero_grad(set_to_none=True)
                row["encoders_ms"] = statistics.median(time_calls(encoders, device, a.steps, a.warmup))
                optimizer.zero_grad(set_to_none=True)
        except Exception as e:  # noqa: BLE001 - OOM at large B is a result, anything else re-raises
            if not is_oom(e):
                raise
            row = {"batch_size": bs, "status": "OOM"}
        finally:
            images = ids = mask = None
            optimizer.zero_grad(set_to_none=True)
            free_device_memory(device)
        rows.append(row)

    ref = REFERENCE["train"]
    on_gpu = device.type == "cuda"
    compare = on_gpu and cfg.preset == "paper"  # the reference ran the paper model on a GPU
    headers = ["B", "ms/step", "pairs/s", "peak GiB", "GFLOP/step", "TFLOP/s", "MFU %", "encoders ms"]
    if compare:
        headers += ["x ref pairs/s"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            body.append([r["batch_size"], r["status"]] + ["-"] * (len(headers) - 2))
            continue
        line = [r["batch_size"], r["ms_per_step"], r["pairs_per_s"], gib(r["peak_mem_bytes"]),
                r["flops_per_step"] / 1e9, r["achieved_tflops"], 100 * r["mfu"], r.get("encoders_ms")]
        if compare:
            r["x_reference_pairs_per_s"] = r["pairs_per_s"] / ref[32]["pairs_per_s"]
            line.append(r["x_reference_pairs_per_s"])
        body.append(line)
    notes = [f"precision: {'bf16 autocast' if b.bf16 else 'fp32'}; channels_last: {b.channels_last}; "
             f"compile: {a.compile}; optimizer: "
             f"{'AdamW(fused=True)' if a.fused_adamw else 'msa.train.build_optimizer'}",
             f"MFU against the measured {b.results['meta']['matmul']['dtype']} matmul rate "
             f"{fmt(b.results['meta']['matmul']['tflops'])} TFLOP/s; FLOPs: FlopCounterMode, one step fwd+bwd",
             f"memory: {rows[0].get('mem_kind', '-') if rows else '-'}",
             "encoders ms: image + text towers fwd+bwd with the triplet loss only (no MSCMAT, no optimizer)",
             f"{REFERENCE_LABEL}: B=32 {ref[32]['ms']} ms/step, {ref[32]['pairs_per_s']:.0f} pairs/s, "
             f"{ref[32]['mem_gib']} GiB; encoders alone {REFERENCE['encoders_ms'][32]} ms"]
    notes.append(_comparability(b))
    print(table(f"train step ({cfg.preset} preset, {device.type}, random inputs, compute only)", headers, body, notes))
    return {"rows": rows, "precision": "bf16" if b.bf16 else "fp32"}


# ----------------------------------------------------------------------------------------- MSCMAT


def _mscmat_inputs(library: nn.Module, bs: int, seq: int, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    d = library.ln_query.normalized_shape[0]
    feats = [torch.randn(bs, s.query_proj.in_features, generator=g).to(device).requires_grad_()
             for s in library.scales]
    tokens = torch.randn(bs, seq, d, generator=g).to(device).requires_grad_()
    cls = F.normalize(torch.randn(bs, d, generator=g), dim=-1).to(device).requires_grad_()
    weights = torch.randn(len(library.scales), bs, bs, generator=g).to(device)
    return feats, tokens, cls, weights


def agreement(library: nn.Module, naive: nn.Module, bs: int, seq: int, device: torch.device) -> dict[str, Any]:
    """Max |library - naive| of the scores and of the input gradients, fp32, no autocast."""
    results = []
    for module in (library, naive):
        feats, tokens, cls, w = _mscmat_inputs(library, bs, seq, device, seed=123)
        scores = module(feats, tokens, cls)
        (scores * w).sum().backward()
        results.append((scores.detach(), [x.grad for x in (*feats, tokens, cls)]))
    (s_lib, g_lib), (s_naive, g_naive) = results
    return {
        "batch_size": bs,
        "max_abs_diff": (s_lib - s_naive).abs().max().item(),
        "max_abs_grad_diff": max((x - y).abs().max().item() for x, y in zip(g_lib, g_naive)),
        "precision": "fp32",
    }


def section_mscmat(b: Bench) -> dict[str, Any]:
    a, device = b.args, b.device
    seq = b.seq - 1  # the local tokens: positions 1..L-1
    library = copy.deepcopy(b.model.mscmat).float().train()
    naive = NaivePairMSCMAT(library).train()
    check_b = min(a.batch_sizes[0], 8)
    log(f"mscmat: naive vs library agreement at B={check_b}")
    agree = agreement(library, naive, check_b, seq, device)
    on_gpu = device.type == "cuda"
    budget_bytes = a.naive_max_gib * GIB if a.naive_max_gib else (
        0.9 * torch.cuda.mem_get_info(device)[0] if on_gpu else 4 * GIB)

    def fwd_bwd(module, inputs):
        feats, tokens, cls, w = inputs

        def call():
            for p in module.parameters():
                p.grad = None
            with b.autocast:
                scores = module(feats, tokens, cls)
            (scores.float() * w).sum().backward()
        return call

    d = library.ln_query.normalized_shape[0]
    rows = []
    naive_ms_per_pair = naive_bytes_per_pair = None
    for bs in a.batch_sizes:
        log(f"mscmat B={bs}")
        inputs = _mscmat_inputs(library, bs, seq, device, seed=bs)
        row: dict[str, Any] = {"batch_size": bs}
        try:
            lib_call = fwd_bwd(library, inputs)
            row["library_ms"] = statistics.median(time_calls(lib_call, device, a.steps, a.warmup))
            mem = measure_peak(lib_call, device)
            row["library_mem_bytes"], row["mem_kind"] = mem.bytes, mem.kind
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            row["library_status"] = "OOM"
        free_device_memory(device)

        # The naive one grows as B^2 * tokens * D: skip it past the time or memory budget instead of crashing.
        pairs = bs * bs
        est_bytes = pairs * (naive_bytes_per_pair or 24 * seq * d * (2 if b.bf16 else 4))
        est_s = None if naive_ms_per_pair is None else pairs * naive_ms_per_pair * (a.steps + a.warmup + 1) / 1e3
        if a.no_naive:
            row["naive_status"] = "skipped (--no-naive)"
        elif est_bytes > budget_bytes or (est_s is not None and est_s > a.naive_budget_s):
            row["naive_status"] = "skipped (budget)"
            row["naive_estimate"] = {"gib": est_bytes / GIB, "s": est_s}
        else:
            try:
                naive_call = fwd_bwd(naive, inputs)
                row["naive_ms"] = statistics.median(time_calls(naive_call, device, a.steps, a.warmup))
                mem = measure_peak(naive_call, device)
                row["naive_mem_bytes"] = mem.bytes
                row["naive_status"] = "ok"
                naive_ms_per_pair = row["naive_ms"] / pairs
                naive_bytes_per_pair = mem.bytes / pairs
                if row.get("library_ms"):
                    row["speedup_vs_naive"] = row["naive_ms"] / row["library_ms"]
                    row["memory_ratio_vs_naive"] = row["naive_mem_bytes"] / max(row["library_mem_bytes"], 1)
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                row["naive_status"] = "skipped (OOM)"
        inputs = None
        free_device_memory(device)
        rows.append(row)

    headers = ["B", "library ms", "library GiB", "naive ms", "naive GiB", "naive/library time", "naive/library mem"]
    ref = REFERENCE["mscmat"]
    compare = on_gpu and b.cfg.preset == "paper"
    if compare:
        headers += ["ref ms", "ref GiB", "ref/library time"]
    body = []
    for r in rows:
        line = [r["batch_size"], r.get("library_ms", r.get("library_status")), gib(r.get("library_mem_bytes")),
                r.get("naive_ms", r.get("naive_status")), gib(r.get("naive_mem_bytes")),
                r.get("speedup_vs_naive"), r.get("memory_ratio_vs_naive")]
        if compare:
            rr = ref.get(r["batch_size"], {})
            if rr and r.get("library_ms"):
                r["x_reference_time"] = rr["ms"] / r["library_ms"]
            line += [rr.get("ms"), rr.get("mem_gib"), r.get("x_reference_time")]
        body.append(line)
    notes = [f"naive vs library agreement (B={agree['batch_size']}, fp32): max |diff| scores "
             f"{agree['max_abs_diff']:.3g}, input grads {agree['max_abs_grad_diff']:.3g}",
             f"precision: {'bf16 autocast' if b.bf16 else 'fp32'} for both; fwd+bwd of sum(w * scores) "
             f"with fixed random w; inputs: {len(library.scales)} scale vectors, {seq} tokens x D={d}",
             f"memory: {rows[0].get('mem_kind', '-') if rows else '-'}, one fwd+bwd",
             f"naive budget: {a.naive_budget_s:g} s projected, {budget_bytes / GIB:.1f} GiB projected",
             f"{REFERENCE_LABEL}: B=32 38 ms; B=64 136 ms, 10.2 GiB; B=128 567 ms, 33.6 GiB"]
    notes.append(_comparability(b))
    print(table(f"MSCMAT forward + backward ({device.type})", headers, body, notes))
    return {"agreement": agree, "rows": rows, "precision": "bf16" if b.bf16 else "fp32"}


# ------------------------------------------------------------------------------------------- eval


def section_eval(b: Bench) -> dict[str, Any]:
    from msa.data import ImageTransform
    from msa.evaluate import embed_split
    from msa.metrics import recall_at_k

    a, device, model = b.args, b.device, b.model
    n_img, n_cap, bs = a.eval_images, a.eval_captions, a.eval_batch_size
    log(f"eval: {n_img} images, {n_cap} captions, batch {bs}")
    images = b.images(n_img)
    ids, mask = b.captions(n_cap, seed=7)
    caption_image = torch.arange(n_cap, device=device) % n_img
    was_training = model.training
    model.eval()

    def embed_images():
        with torch.inference_mode(), b.autocast:
            return torch.cat([model.encode_image(images[s:s + bs])[0].float() for s in range(0, n_img, bs)])

    def embed_text():
        with torch.inference_mode(), b.autocast:
            return torch.cat([model.encode_text(ids[s:s + bs], mask[s:s + bs])[0].float()
                              for s in range(0, n_cap, bs)])

    def rank(img, txt):
        with torch.inference_mode():
            return recall_at_k(img @ txt.T, caption_image)

    embed_images(), embed_text()  # warm-up (kernels, allocator)
    runs = []
    for _ in range(max(1, min(a.steps, 3))):
        t_img, img = wall_s(embed_images, device)
        t_txt, txt = wall_s(embed_text, device)
        t_rank, metrics = wall_s(lambda: rank(img, txt), device)
        runs.append((t_img, t_txt, t_rank))
    t_img, t_txt, t_rank = (statistics.median(x) for x in zip(*runs))
    total = t_img + t_txt + t_rank
    result: dict[str, Any] = {
        "images": n_img, "captions": n_cap, "batch_size": bs,
        "scaled_down": (n_img, n_cap) != (RSICD_TEST_IMAGES, RSICD_TEST_CAPTIONS),
        "image_embed_s": t_img, "text_embed_s": t_txt, "rank_s": t_rank, "total_s": total,
        "per_caption_ms": total / n_cap * 1e3, "mR_random_model": metrics["mR"],
    }
    images = ids = mask = None
    free_device_memory(device)

    # The library's own path: shard reading + in-process decode + embedding, on a small synthetic split.
    corpus = b.corpus()
    transform = ImageTransform(b.cfg.image.size)

    def e2e():
        return embed_split(model, corpus["test_urls"], transform=transform, tokenizer=b.tokenizer,
                           max_tokens=b.seq, batch_size=bs, device=device,
                           autocast_dtype=torch.bfloat16 if b.bf16 else None)

    e2e()
    t_e2e, split = wall_s(e2e, device)
    t_rank_e2e, _ = wall_s(lambda: recall_at_k(split.similarities(), split.caption_image), device)
    n_e2e = split.image_emb.shape[0]
    per_image = (t_e2e + t_rank_e2e) / n_e2e
    result["end_to_end"] = {"images": n_e2e, "captions": split.text_emb.shape[0], "image_px": corpus["image_px"],
                            "s": t_e2e + t_rank_e2e, "per_image_ms": per_image * 1e3,
                            "projected_rsicd_s": per_image * RSICD_TEST_IMAGES}
    model.train(was_training)

    on_gpu = device.type == "cuda"
    e = result["end_to_end"]
    headers = ["what", "images", "captions", "image embed s", "text embed s", "rank s", "total s", "ms/caption"]
    body = [["random tensors on the device", n_img, n_cap, t_img, t_txt, t_rank, total, result["per_caption_ms"]],
            ["embed_split over synthetic shards", e["images"], e["captions"], "-", "-", t_rank_e2e, e["s"],
             e["s"] / e["captions"] * 1e3]]
    notes = [f"embedding batch {bs}; precision {'bf16 autocast' if b.bf16 else 'fp32'}; ranking: msa.metrics."
             f"recall_at_k on {device.type}",
             f"embed_split path (read + decode + transform in-process, {e['image_px']}px jpg): "
             f"{fmt(e['per_image_ms'])} ms/image (captions included) -> projected {fmt(e['projected_rsicd_s'])} s for "
             f"{RSICD_TEST_IMAGES:,} images"]
    if result["scaled_down"]:
        notes.append(f"SCALED DOWN: {n_img} images / {n_cap} captions instead of RSICD's "
                     f"{RSICD_TEST_IMAGES:,} / {RSICD_TEST_CAPTIONS:,}")
    notes.append(f"{REFERENCE_LABEL}: {REFERENCE['eval']['per_caption_ms']} ms per caption, "
                 f"~{REFERENCE['eval']['total_s']:.0f} s for RSICD size")
    if on_gpu and b.cfg.preset == "paper" and not result["scaled_down"]:
        result["x_reference"] = REFERENCE["eval"]["total_s"] / total
        notes.append(f"vs reference: {fmt(result['x_reference'])}x faster")
    notes.append(_comparability(b))
    print(table(f"evaluation ({device.type})", headers, body, notes))
    return result


# ----------------------------------------------------------------------------------------- loader


def _cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


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
        cpu0 = _cpu_seconds(resource.RUSAGE_SELF)
        child0 = _cpu_seconds(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        it = iter(loader)
        first = next(it)
        t_first = time.perf_counter() - t0
        n = 1
        for _ in it:
            n += 1
        elapsed = time.perf_counter() - t0
        main_cpu = _cpu_seconds(resource.RUSAGE_SELF) - cpu0
        del it, first  # shuts the worker down and reaps it: its CPU time is in RUSAGE_CHILDREN now
        worker_cpu = _cpu_seconds(resource.RUSAGE_CHILDREN) - child0
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


# ------------------------------------------------------------------------------------------- main


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in SECTIONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown sections {bad}; choose from {','.join(SECTIONS)}")
    return tuple(dict.fromkeys(names))


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" unless the help text already states its default or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS, []):
            return text
        default = ",".join(map(str, action.default)) if isinstance(action.default, tuple) else action.default
        return f"{text} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    from msa.config import PRESETS

    p = argparse.ArgumentParser(
        prog="python -m msa.bench",
        description=__doc__.split("\n\n")[0] + " Training step, MSCMAT, evaluation and loader timings; "
        "see the module docstring for what each section measures.",
        formatter_class=_HelpFormatter,
        epilog="Examples: GPU, paper preset: python -m msa.bench.  CPU smoke test: python -m msa.bench --tiny "
        "--device cpu --json out.json.  Small CPU run: python -m msa.bench --device cpu --preset small "
        "--batch-sizes 8,32 --steps 3.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model preset; towers are always randomly initialised (compute only). "
                   "Default: paper on a GPU, small on the CPU or with --tiny")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override on top of the preset, repeatable (e.g. image.size=128)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (cuda when available)")
    p.add_argument("--batch-sizes", type=_int_list, default=None,
                   help="comma-separated batch sizes for train and mscmat. Default 32,128,256,512 (--tiny: 4,8)")
    p.add_argument("--steps", type=int, default=None, help="timed calls per measurement, median reported "
                   "(default 10; --tiny: 2); eval repeats min(steps, 3) times")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 3; --tiny: 1)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for train, mscmat and eval; GPU only, as in training "
                   "(default: the preset's train.bf16 on a GPU, off on the CPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format for the CNN and its input, GPU only (default: off, as "
                   "msa.train does today; --channels-last measures what it would gain)")
    p.add_argument("--sections", type=_sections, default=SECTIONS,
                   help=f"comma-separated subset of {','.join(SECTIONS)}, run in that order")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke sizes: small preset at 32px, B=4,8, 2 steps, a scaled-down eval split and "
                   "corpus; numbers are for checking the benchmark runs, not for performance")
    p.add_argument("--matmul-tflops", type=float, default=None,
                   help="peak matrix rate for MFU in TFLOP/s instead of measuring it (measured: a large "
                   "bf16 matmul on a GPU, fp32 on the CPU)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write every number to this JSON file")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op CPU threads (default: torch's choice; --tiny: 1). On a loaded machine "
                   "use 1: with more threads than free cores every op waits on descheduled threads")
    g = p.add_argument_group("train options")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for the train step "
                   "(compilation happens in the warm-up; FLOPs are counted on the eager model)")
    g.add_argument("--fused-adamw", action="store_true",
                   help="AdamW(fused=True) with the preset's hyper-parameters instead of msa.train.build_optimizer")
    g.add_argument("--cudnn-benchmark", action="store_true", help="set torch.backends.cudnn.benchmark=True")
    g.add_argument("--no-encoders-row", action="store_true", help="skip the encoders-only fwd+bwd timing")
    g = p.add_argument_group("mscmat options")
    g.add_argument("--no-naive", action="store_true", help="skip the naive pair-by-pair baseline timings "
                   "(the agreement check still runs)")
    g.add_argument("--naive-budget-s", type=float, default=60.0,
                   help="skip the naive baseline at a batch size whose projected time (warm-up + steps, "
                   "extrapolated as B^2 from the previous size) exceeds this")
    g.add_argument("--naive-max-gib", type=float, default=None,
                   help="skip the naive baseline when its projected memory exceeds this (default: 90%% of "
                   "free GPU memory; 4 GiB on the CPU)")
    g = p.add_argument_group("eval options")
    g.add_argument("--eval-images", type=int, default=None,
                   help=f"images in the eval split (default RSICD test size {RSICD_TEST_IMAGES}; --tiny: 32)")
    g.add_argument("--eval-captions", type=int, default=None,
                   help=f"captions in the eval split (default {RSICD_TEST_CAPTIONS}; --tiny: 160)")
    g.add_argument("--eval-batch-size", type=int, default=None,
                   help="embedding batch size (default: 512 on a GPU, the preset's train.eval_batch_size on "
                   "the CPU; --tiny: 32)")
    g.add_argument("--e2e-images", type=int, default=None,
                   help="synthetic test images for the end-to-end embed_split timing (default 64; --tiny: 8)")
    g = p.add_argument_group("loader options")
    g.add_argument("--loader-workers", type=_int_list, default=(0, 1), help="DataLoader worker counts to measure")
    g.add_argument("--loader-images", type=int, default=None,
                   help="synthetic train images in the loader's shard set (default 64; --tiny: 12)")
    g.add_argument("--loader-batches", type=int, default=None, help="batches read per measurement "
                   "(default 50; --tiny: 6)")
    g.add_argument("--loader-batch-size", type=int, default=None,
                   help="loader batch size (default: the preset's train.batch_size; --tiny: 8)")
    g.add_argument("--loader-image-px", type=int, default=None,
                   help="stored image size of the synthetic corpus (default: the model's input size)")
    return p


def _resolve(args: argparse.Namespace) -> tuple[argparse.Namespace, torch.device, Any]:
    from msa.config import resolve_config

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("msa.bench: --device cuda but CUDA is not available")
    tiny = args.tiny
    preset = args.preset or ("paper" if device.type == "cuda" and not tiny else "small")
    overrides = (list(TINY["overrides"]) if tiny else []) + ["image.weights=null", "text.weights=null"] + args.set
    cfg = resolve_config(preset, overrides)

    def pick(name, default, tiny_value=None):
        if getattr(args, name) is None:
            setattr(args, name, tiny_value if tiny and tiny_value is not None else default)

    pick("batch_sizes", (32, 128, 256, 512), TINY["batch_sizes"])
    pick("steps", 10, TINY["steps"])
    pick("warmup", 3, TINY["warmup"])
    pick("eval_images", RSICD_TEST_IMAGES, TINY["eval_images"])
    pick("eval_captions", RSICD_TEST_CAPTIONS, TINY["eval_captions"])
    pick("eval_batch_size", 512 if device.type == "cuda" else cfg.train.eval_batch_size, TINY["eval_batch_size"])
    pick("e2e_images", 64, TINY["e2e_images"])
    pick("loader_images", 64, TINY["loader_images"])
    pick("loader_batches", 50, TINY["loader_batches"])
    pick("loader_batch_size", cfg.train.batch_size, TINY["loader_batch_size"])
    if min(args.batch_sizes) < 1 or args.steps < 1 or args.warmup < 0:
        raise SystemExit("msa.bench: batch sizes and --steps must be >= 1, --warmup >= 0")
    if args.bf16 is None:
        args.bf16 = cfg.train.bf16 and device.type == "cuda"
    if args.bf16 and device.type != "cuda":
        log("--bf16 applies on a GPU only (as in training): running fp32 on the CPU")
        args.bf16 = False
    if args.threads is None and tiny:
        args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("msa.bench: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.channels_last and device.type != "cuda":
        log("--channels-last applies on a GPU only: ignored on the CPU")
    args.channels_last = bool(args.channels_last) and device.type == "cuda"
    return args, device, cfg


def main(argv: list[str] | None = None) -> int:
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    args, device, cfg = _resolve(build_parser().parse_args(argv))
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    cpu_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    meta: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "preset": cfg.preset,
        "tiny": args.tiny,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "batch_sizes": list(args.batch_sizes),
        "steps": args.steps,
        "warmup": args.warmup,
        "config": cfg.to_dict(),
    }
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    meta["load_average"] = load
    if device.type == "cpu" and load > cores:
        log(f"WARNING: load average {load:.1f} on {cores} cores: CPU timings here measure contention as much "
            f"as the code (threads: {torch.get_num_threads()})")
    if args.matmul_tflops:
        meta["matmul"] = {"tflops": args.matmul_tflops, "dtype": "bf16" if device.type == "cuda" else "fp32",
                          "source": "--matmul-tflops"}
    else:
        log("measuring the matmul peak")
        meta["matmul"] = measure_matmul_tflops(device, TINY["matmul_n"] if args.tiny else None)
    results: dict[str, Any] = {"meta": meta, "sections": list(args.sections)}
    bench = Bench(args, device, cfg, args.bf16, args.channels_last, results)
    print(f"msa.bench: {meta['device']}, torch {meta['torch']}, {meta['threads']} threads; preset {cfg.preset}"
          f"{' (--tiny: smoke sizes, not performance figures)' if args.tiny else ''}; image {cfg.image.backbone} "
          f"@{cfg.image.size}px, text {cfg.text.model} {cfg.text.config_overrides or ''}, "
          f"{cfg.text.max_tokens} tokens; bf16 {args.bf16}; matmul peak {fmt(meta['matmul']['tflops'])} TFLOP/s "
          f"({meta['matmul']['dtype']}, {meta['matmul']['source']})")
    runners = {"train": section_train, "mscmat": section_mscmat, "eval": section_eval, "loader": section_loader}
    with tempfile.TemporaryDirectory(prefix="msa-bench-") as tmp:
        bench.tmp = Path(tmp)
        for name in args.sections:
            t0 = time.perf_counter()
            results[name] = runners[name](bench)
            results[name]["section_s"] = time.perf_counter() - t0
    meta["maxrss_gib"] = maxrss_gib()
    if device.type == "cuda":
        _print_targets(results)
    else:
        print("\ntargets: GPU figures, not evaluated on the CPU")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, default=str))
        log(f"wrote {args.json}")
    return 0


def _print_targets(results: dict[str, Any]) -> None:
    if results["meta"]["preset"] != "paper":
        print("\ntargets: set for the paper preset, not evaluated for preset " + results["meta"]["preset"])
        return
    lines = []
    ref_rate = REFERENCE["train"][32]["pairs_per_s"]
    train = {r["batch_size"]: r for r in results.get("train", {}).get("rows", []) if r.get("status") == "ok"}
    if 32 in train:
        x = train[32]["pairs_per_s"] / ref_rate
        lines.append(f"train B=32 >= {TARGETS['train_b32_x_ref']:g}x reference pairs/s: {x:.2f}x "
                     f"-> {'met' if x >= TARGETS['train_b32_x_ref'] else 'NOT met'}")
    big = [r for b, r in train.items() if b >= 256]
    if big and results["meta"]["bf16"]:
        x = max(r["pairs_per_s"] for r in big) / ref_rate
        lines.append(f"train B>=256 bf16 >= {TARGETS['train_b256_bf16_x_ref']:g}x reference: {x:.2f}x "
                     f"-> {'met' if x >= TARGETS['train_b256_bf16_x_ref'] else 'NOT met'}")
    m = {r["batch_size"]: r for r in results.get("mscmat", {}).get("rows", [])}
    if 128 in m and m[128].get("library_ms"):
        r = m[128]
        if r.get("naive_ms"):
            frac = r["library_ms"] / r["naive_ms"]
            lines.append(f"mscmat B=128 < 1/20 of naive time: {frac:.4f} -> "
                         f"{'met' if frac < TARGETS['mscmat_b128_naive_fraction'] else 'NOT met'}")
        g = r["library_mem_bytes"] / GIB
        lines.append(f"mscmat B=128 < 2 GiB: {g:.3f} GiB -> {'met' if g < TARGETS['mscmat_b128_gib'] else 'NOT met'}")
    ev = results.get("eval")
    if ev and not ev["scaled_down"]:
        lines.append(f"eval RSICD size < 3 s: {ev['total_s']:.2f} s -> {'met' if ev['total_s'] < 3 else 'NOT met'}")
    if lines:
        print("\ntargets (GPU):\n  " + "\n  ".join(lines))


if __name__ == "__main__":
    sys.exit(main())
