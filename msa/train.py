"""Torch-only training pieces: optimiser, one epoch, checkpoints. The Ray driver composes them."""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from msa.config import MSAConfig, OptimConfig
from msa.model import MSAModel, compute_loss

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"  # per-epoch metrics so far, readable without loading the weights


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over all parameters with one lr, no schedule (spec section 4)."""
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps
    )


def autocast_dtype(cfg: MSAConfig, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if cfg.train.bf16 and device.type == "cuda" else None


@dataclass
class EpochStats:
    loss: float
    triplet: float
    align: float
    cons: float
    steps: int
    pairs_per_s: float

    def as_metrics(self, prefix: str = "train_") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in vars(self).items()}


def train_epoch(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    cfg: MSAConfig,
    device: torch.device,
    progress=None,
) -> EpochStats:
    """One pass; ``model`` may be DDP-wrapped. Loss sums stay on the device until the end."""
    model.train()
    dtype = autocast_dtype(cfg, device)
    totals = torch.zeros(4, device=device, dtype=torch.float64)
    steps = pairs = 0
    start = time.perf_counter()
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        parts = compute_loss(out, cfg.loss, batch["image_ids"])
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        optimizer.step()
        totals += torch.stack([parts[k].detach().double() for k in ("total", "triplet", "align", "cons")])
        steps += 1
        pairs += batch["images"].shape[0]
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{parts['total'].item():.2f}")
    elapsed = time.perf_counter() - start
    if steps == 0:
        raise RuntimeError("the epoch yielded no batches")
    mean = (totals / steps).tolist()
    return EpochStats(*mean, steps=steps, pairs_per_s=pairs / max(elapsed, 1e-9))


def save_checkpoint(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    epoch: int,
    cfg: MSAConfig,
    dataset_digest: str,
    metrics: dict[str, float],
    history: list[dict[str, float]],
) -> Path:
    """Atomic writes (temp file then rename) of everything needed to resume or serve."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": epoch,
        "config": cfg.to_dict(),
        "dataset_digest": dataset_digest,
        "metrics": metrics,
        "history": history,
    }
    path = directory / CHECKPOINT_FILE
    _atomic(path, lambda tmp: torch.save(state, tmp))
    _atomic(directory / HISTORY_FILE, lambda tmp: Path(tmp).write_text(json.dumps(history)))
    return path


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no MSA checkpoint here")
    return torch.load(path, map_location=map_location, weights_only=False)


def model_from_checkpoint(state: dict[str, Any]) -> tuple[MSAModel, MSAConfig]:
    """Rebuild the architecture from the stored config (random init, no hub), then load weights."""
    cfg = MSAConfig.from_dict(state["config"])
    build_cfg = MSAConfig.from_dict(
        {
            **cfg.to_dict(),
            "image": {**cfg.to_dict()["image"], "weights": None},
            "text": {**cfg.to_dict()["text"], "weights": None},
        }
    )
    model = MSAModel(build_cfg)
    model.load_state_dict(state["model"])
    return model, cfg


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model
