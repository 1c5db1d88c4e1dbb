"""Checkpoint files: everything to resume or serve a model, written atomically, read back without a hub.

A checkpoint directory holds ``checkpoint.pt`` (weights, optimiser state, epoch, the resolved config,
the dataset digest, metrics and history), ``history.json`` (the per-epoch metrics so far, readable
without loading the weights) and, written last, ``manifest.json`` (each file's size and sha256). Each is
written to a temp file and renamed into place.

A checkpoint whose files are missing, truncated, not valid JSON, not a torch archive or differ from the
sizes and digests its manifest records is refused with :class:`CorruptCheckpointError` (a flipped byte in
a tensor would otherwise load silently). Checkpoints written before the manifest existed are read without
the digest check. ``load_newest`` resumes from the newest readable one of several: each unreadable one is
named in one log line and skipped, not deleted (it stays for inspection); with none readable, training
starts from scratch and says so, rather than stopping: a fallback costs epochs, never files.

A checkpoint holds only tensors, plain containers (dict, list, tuple), numbers, booleans, None and
strings, and is read with ``torch.load(..., weights_only=True)``: a file that holds anything else
(a pickled object, whose unpickling could run code) is refused with :class:`UnsafeCheckpointError`
and nothing in it is executed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from msa.config import MSAConfig
from msa.model import MSAModel

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.json"
MANIFEST_FILE = "manifest.json"

LOG = logging.getLogger(__name__)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holding something other than tensors, plain containers, numbers and strings.

    Not a corrupt checkpoint: resume does not fall back past it, since a pickled object in a checkpoint
    store means someone other than ``save_checkpoint`` wrote there, and that needs a person to look."""


class CorruptCheckpointError(ValueError):
    """A checkpoint directory whose files are missing, truncated, garbled or differ from their manifest."""

    def __init__(self, directory: Path, problem: str):
        super().__init__(f"{directory}: {problem}")
        self.directory, self.problem = directory, problem


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
    files = {}

    def write(name: str, tmp: str, save: Callable[[str], None]) -> None:
        save(tmp)
        files[name] = _fingerprint(Path(tmp))

    atomic_write(path, lambda tmp: write(CHECKPOINT_FILE, tmp, lambda t: torch.save(state, t)))
    atomic_write(directory / HISTORY_FILE,
                 lambda tmp: write(HISTORY_FILE, tmp, lambda t: Path(t).write_text(json.dumps(state["history"]))))
    atomic_write(directory / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(json.dumps({"files": files})))
    return path


def _fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(path.parent, f"{path.name} is not valid JSON ({exc})") from None


def read_history(directory: str | Path) -> list[dict[str, float]]:
    """The per-epoch metrics in ``directory/history.json``; CorruptCheckpointError naming it if garbled."""
    history = _read_json(Path(directory) / HISTORY_FILE)
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise CorruptCheckpointError(Path(directory), f"{HISTORY_FILE} is not a list of per-epoch metrics")
    return history


def verify_files(directory: Path) -> None:
    """CorruptCheckpointError unless every file the manifest lists has its recorded size and sha256, and
    history.json (where present) parses. No manifest (an older checkpoint, or a fetched checkpoint.pt
    alone): only the JSON is checked."""
    manifest = directory / MANIFEST_FILE
    if manifest.exists():
        files = _read_json(manifest)
        files = files.get("files") if isinstance(files, dict) else None
        if not isinstance(files, dict) or not all(isinstance(w, dict) and {"bytes", "sha256"} <= set(w)
                                                  for w in files.values()):
            raise CorruptCheckpointError(directory, f"{MANIFEST_FILE} does not list files with sizes and digests")
        for name, want in files.items():
            path = directory / name
            if not path.exists():
                raise CorruptCheckpointError(directory, f"{name} is missing")
            got = _fingerprint(path)
            if got["bytes"] != want["bytes"]:
                raise CorruptCheckpointError(directory, f"{name} has {got['bytes']} bytes, {want['bytes']} recorded")
            if got["sha256"] != want["sha256"]:
                raise CorruptCheckpointError(directory, f"{name} does not match its recorded sha256")
    if (directory / HISTORY_FILE).exists():
        read_history(directory)


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state ``save_checkpoint`` wrote, read with ``weights_only=True`` (nothing in the file runs).

    Raises FileNotFoundError when there is no checkpoint, CorruptCheckpointError when its files are
    damaged (``verify_files``; a file that is not a torch archive), UnsafeCheckpointError (naming the
    file) when it holds anything but tensors, plain containers, numbers and strings."""
    directory = Path(directory)
    path = directory / CHECKPOINT_FILE
    if not path.exists():
        if (directory / MANIFEST_FILE).exists() or (directory / HISTORY_FILE).exists():
            raise CorruptCheckpointError(directory, f"{CHECKPOINT_FILE} is missing")
        raise FileNotFoundError(f"{path}: no MSA checkpoint here")
    verify_files(directory)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one has no central directory
        raise CorruptCheckpointError(directory, f"{CHECKPOINT_FILE} is not a torch archive (truncated or overwritten)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError) as exc:
        raise CorruptCheckpointError(directory, f"{CHECKPOINT_FILE} does not load ({str(exc)[:200]})") from None
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


def load_newest(
    candidates: Iterable[tuple[str, Callable[[], dict[str, Any]]]],
    log: Callable[[str], None] = LOG.warning,
) -> dict[str, Any] | None:
    """The state of the first of ``candidates`` (name, loader; newest first) that loads, or None.

    Each unreadable one (CorruptCheckpointError, or gone: FileNotFoundError) is skipped with one line on
    ``log``: "checkpoint epoch-0003 unreadable (<problem>): resuming from epoch-0002". With none readable
    the run starts from scratch, and the last line says so. ``candidates`` is read lazily: older ones are
    listed only when a newer one fails. UnsafeCheckpointError is raised, not skipped.
    """
    skipped: list[tuple[str, str]] = []
    for name, load in candidates:
        try:
            state = load()
        except CorruptCheckpointError as exc:
            skipped.append((name, exc.problem))
            continue
        except FileNotFoundError as exc:
            skipped.append((name, str(exc)))
            continue
        for bad, problem in skipped:
            log(f"checkpoint {bad} unreadable ({problem}): resuming from {name}")
        return state
    for bad, problem in skipped:
        log(f"checkpoint {bad} unreadable ({problem})")
    if skipped:
        log(f"no readable checkpoint among {len(skipped)}: training starts from scratch")
    return None


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
