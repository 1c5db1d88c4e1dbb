"""Constants, the reference figures and the table formatting shared by every section of ``msa.bench``."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

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


def comparability(device_type: str, preset: str) -> str:
    """The note every section ends with: whether this run may be set beside the GPU reference."""
    if device_type != "cuda":
        return "this is a CPU run: the reference and the targets are GPU figures, not comparable"
    if preset != "paper":
        return f"preset {preset}: the reference ran the paper model, so no ratios are computed"
    return "ratios vs the reference: same model and batch, this GPU vs the authors' H100 (fp32)"
