"""The ``mscmat`` section: the library MSCMAT forward + backward against a naive pair-by-pair baseline.

``NaivePairMSCMAT`` is the reference's pair-by-pair MSCMAT, kept here (never in the library) as the
in-run baseline; ``agreement`` first shows that the two give the same scores and input gradients
(max |diff| printed). The naive module grows as B^2 * tokens * D, so it is skipped at a batch size
whose projected time or memory is over budget instead of crashing.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msa.bench.common import GIB, REFERENCE, REFERENCE_LABEL, gib, log, table
from msa.bench.context import Bench
from msa.bench.timing import free_device_memory, is_oom, measure_peak, time_calls


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
    notes.append(b.comparability)
    print(table(f"MSCMAT forward + backward ({device.type})", headers, body, notes))
    return {"agreement": agree, "rows": rows, "precision": "bf16" if b.bf16 else "fp32"}
