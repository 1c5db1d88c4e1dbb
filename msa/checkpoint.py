"""Checkpoint files: everything to resume or serve a model, written atomically, read back without a hub.

A checkpoint directory holds ``checkpoint.pt`` (weights, optimiser state, epoch, the resolved config,
the dataset digest, metrics and history) and ``history.json`` (the per-epoch metrics so far,
readable without loading the weights). Both are written to a temp file and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from msa.config import MSAConfig
from msa.model import MSAModel

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temp file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    atomic_write(directory / HISTORY_FILE, lambda tmp: Path(tmp).write_text(json.dumps(history)))
    return path


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no MSA checkpoint here")
    return torch.load(path, map_location=map_location, weights_only=False)


def model_from_checkpoint(state: dict[str, Any]) -> tuple[MSAModel, MSAConfig]:
    """Rebuild the architecture from the stored config (random init, no hub), then load the weights."""
    cfg = MSAConfig.from_dict(state["config"])
    data = cfg.to_dict()
    build_cfg = MSAConfig.from_dict(
        {**data, "image": {**data["image"], "weights": None}, "text": {**data["text"], "weights": None}}
    )
    model = MSAModel(build_cfg)
    model.load_state_dict(state["model"])
    return model, cfg
