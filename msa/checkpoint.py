"""Checkpoint files: everything to resume or serve a model, written atomically, read back without a hub.

A checkpoint directory holds ``checkpoint.pt`` (weights, optimiser state, epoch, the resolved config,
the dataset digest, metrics and history) and ``history.json`` (the per-epoch metrics so far,
readable without loading the weights). Both are written to a temp file and renamed into place.

A checkpoint holds only tensors, plain containers (dict, list, tuple), numbers, booleans, None and
strings, and is read with ``torch.load(..., weights_only=True)``: a file that holds anything else
(a pickled object, whose unpickling could run code) is refused with :class:`UnsafeCheckpointError`
and nothing in it is executed.
"""

from __future__ import annotations

import json
import numbers
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from msa.config import MSAConfig
from msa.model import MSAModel

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holding something other than tensors, plain containers, numbers and strings."""


def _plain(value: Any, where: str) -> Any:
    """``value`` as tensors, dict/list/tuple, bool/int/float/None and str only (numpy scalars become
    Python numbers), so that ``weights_only`` loading accepts it; TypeError naming ``where`` otherwise."""
    if value is None or isinstance(value, (bool, str, torch.Tensor)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"checkpoint {where}: {type(value).__module__}.{type(value).__qualname__} is not a tensor, "
                    "number, string or plain container (a checkpoint must load with weights_only=True)")


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
        "epoch": int(epoch),
        "config": _plain(cfg.to_dict(), "config"),
        "dataset_digest": str(dataset_digest),
        "metrics": _plain(metrics, "metrics"),
        "history": _plain(history, "history"),
    }
    path = directory / CHECKPOINT_FILE
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    atomic_write(directory / HISTORY_FILE, lambda tmp: Path(tmp).write_text(json.dumps(state["history"])))
    return path


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state ``save_checkpoint`` wrote, read with ``weights_only=True`` (nothing in the file runs).

    Raises FileNotFoundError when there is no checkpoint, UnsafeCheckpointError (naming the file) when
    it holds anything but tensors, plain containers, numbers and strings."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no MSA checkpoint here")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: ([^.\n]*)", str(exc))
        detail = found[1].strip() if found else ""
        raise UnsafeCheckpointError(
            f"{path}: refused: it does not load as plain data (tensors, containers, numbers, strings) with "
            "weights_only=True" + (f" ({detail})" if detail else "") + "; the objects it holds were not "
            "unpickled, since unpickling them could run code"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path}: not an MSA checkpoint (no 'model' and 'config' entries)")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> tuple[MSAModel, MSAConfig]:
    """Rebuild the architecture from the stored config (random init, no hub), then load the weights."""
    cfg = MSAConfig.from_dict(state["config"])
    data = cfg.to_dict()
    build_cfg = MSAConfig.from_dict({
        **data, "image": {**data["image"], "weights": None}, "text": {**data["text"], "weights": None},
        "clip": {**data["clip"], "checkpoint": None, "random_init": True},
    })
    model = MSAModel(build_cfg)
    model.load_state_dict(state["model"])
    return model, cfg
