"""The ``train`` section: one full optimisation step, timed exactly as training runs it.

The timed call is ``msa.engine.train_step(model, batch, optimizer, cfg, device)``, the step that
``msa.engine.train_epoch`` and ``fit`` run (batch to the device, autocast when configured,
``msa.losses.compute_loss``, zero_grad, backward, optimizer step), on random inputs, compute only.
Reported: ms/step, pairs/s, peak memory, model FLOPs (``FlopCounterMode``, fwd+bwd, one untimed step on
the eager model) and MFU against the measured matrix-multiply rate of the device.

Training-path options come from the config, as in training: ``--compile``, ``--channels-last`` and
``--fused-adamw`` set ``train.compile``, ``train.channels_last`` and ``train.fused_adamw`` of the run's
config (so do ``--set train.compile=true`` etc.), and the model and optimizer are prepared by
``msa.engine.prepare_training``, the function ``fit`` calls; ``--bf16`` / ``--no-bf16`` set ``train.bf16``
of the config the step reads, so the engine's own ``autocast_dtype`` decides. Nothing is applied bench-side.
"""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import Tensor

from msa.bench.common import REFERENCE, REFERENCE_LABEL, fmt, gib, log, table
from msa.bench.context import Bench
from msa.bench.timing import LiveTensorBytes, free_device_memory, is_oom, profile_calls, time_calls

STEP = "msa.engine.train_step"


def step_config(cfg: Any, bf16: bool) -> Any:
    """The run's config with ``train.bf16`` set to the bench's precision, for the engine to read."""
    if cfg.train.bf16 == bf16:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"bf16": bf16})})


def optimizer_label(optimizer: torch.optim.Optimizer) -> str:
    fused = optimizer.defaults.get("fused")
    return f"AdamW(fused=True) ({len(optimizer.param_groups)} groups)" if fused else \
        f"AdamW ({len(optimizer.param_groups)} groups)"


def _measure(b: Bench, bs: int, model, eager, optimizer, step_cfg, peak: float, static: int) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from msa.engine import train_step
    from msa.losses import hardest_triplet_loss

    a, device, cfg = b.args, b.device, b.cfg
    row: dict[str, Any] = {"batch_size": bs, "status": "ok"}
    ids, mask = b.captions(bs, seed=bs)
    batch = {"images": b.images(bs), "input_ids": ids, "attention_mask": mask,
             "image_ids": torch.arange(bs, device=device)}

    def step(net=model):
        train_step(net, batch, optimizer, step_cfg, device)

    def encoders(net=eager):
        with b.autocast:
            v, _ = net.encode_image(batch["images"])
            t, _ = net.encode_text(ids, mask)
        negatives = {"negatives": cfg.loss.triplet_negatives} if hasattr(cfg.loss, "triplet_negatives") else {}
        hardest_triplet_loss(v.float(), t.float(), margin=cfg.loss.margin, **negatives).backward()

    # One untimed step counts FLOPs (and, on the CPU, memory): eager model, so compile does not interfere.
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
    if a.profile:
        row["profile"] = profile_calls(step, device)
    if not a.no_encoders_row:
        optimizer.zero_grad(set_to_none=True)
        row["encoders_ms"] = statistics.median(time_calls(encoders, device, a.steps, a.warmup))
        optimizer.zero_grad(set_to_none=True)
    return row


def section_train(b: Bench) -> dict[str, Any]:
    from msa.engine import prepare_training

    a, device, cfg = b.args, b.device, b.cfg
    step_cfg = step_config(cfg, b.bf16)
    eager = b.model
    model, optimizer = prepare_training(step_cfg, eager, device)  # as msa.engine.fit prepares them
    eager.train()
    peak = b.results["meta"]["matmul"]["tflops"] * 1e12
    static = sum(p.numel() * p.element_size() for p in eager.parameters())
    rows = []
    for bs in a.batch_sizes:
        log(f"train B={bs}")
        try:
            row = _measure(b, bs, model, eager, optimizer, step_cfg, peak, static)
        except Exception as e:  # noqa: BLE001 - OOM at large B is a result, anything else re-raises
            if not is_oom(e):
                raise
            row = {"batch_size": bs, "status": "OOM"}
        else:  # the row as soon as it is measured: a run stopped at a later batch size still reports it
            log(f"train B={bs}: {fmt(row['ms_per_step'])} ms/step, {fmt(row['pairs_per_s'])} pairs/s, "
                f"peak {fmt(gib(row['peak_mem_bytes']))} GiB")
        finally:
            optimizer.zero_grad(set_to_none=True)
            free_device_memory(device)
        rows.append(row)

    ref = REFERENCE["train"]
    compare = device.type == "cuda" and cfg.preset == "paper"  # the reference ran the paper model on a GPU
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
    t = step_cfg.train
    notes = [f"step: {STEP} (the training path's step), model and optimizer from msa.engine.prepare_training",
             f"precision: {'bf16 autocast' if b.bf16 else 'fp32'}; channels_last: {t.channels_last}; "
             f"compile: {t.compile}; tf32: {t.tf32 and not b.bf16 and device.type == 'cuda'}; "
             f"optimizer: {optimizer_label(optimizer)}; grad clip: {step_cfg.optim.grad_clip}",
             f"MFU against the measured {b.results['meta']['matmul']['dtype']} matmul rate "
             f"{fmt(b.results['meta']['matmul']['tflops'])} TFLOP/s; FLOPs: FlopCounterMode, one step fwd+bwd",
             f"memory: {rows[0].get('mem_kind', '-') if rows else '-'}",
             "encoders ms: image + text towers fwd+bwd with the triplet loss only (no MSCMAT, no optimizer)",
             f"{REFERENCE_LABEL}: B=32 {ref[32]['ms']} ms/step, {ref[32]['pairs_per_s']:.0f} pairs/s, "
             f"{ref[32]['mem_gib']} GiB; encoders alone {REFERENCE['encoders_ms'][32]} ms",
             b.comparability]
    print(table(f"train step ({cfg.preset} preset, {device.type}, random inputs, compute only)", headers, body, notes))
    for r in rows:
        if "profile" in r:
            print(_profile_table(r))
    return {"rows": rows, "precision": "bf16" if b.bf16 else "fp32", "step": STEP}


def _profile_table(row: dict[str, Any]) -> str:
    prof = row["profile"]
    title = f"profile of the train step, B={row['batch_size']} (torch.profiler, {prof['steps']} steps)"
    notes = [f"self ms: {prof['self_time']} time per step, the operator's own (not its children's)"]
    if "device_busy_ms" in prof:
        busy = prof["device_busy_ms"]
        notes.insert(0, f"device busy {fmt(busy)} ms of the {fmt(row['ms_per_step'])} ms step "
                        f"({100 * busy / row['ms_per_step']:.0f}%), {fmt(prof['kernels'])} kernels a step")
    body = [[op["op"][:70], op["calls"], op["self_ms"]] for op in prof["top_ops"]]
    return table(title, ["operator", "calls/step", "self ms"], body, notes)
