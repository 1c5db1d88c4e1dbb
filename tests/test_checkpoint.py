"""Checkpoint files hold plain data only: what save_checkpoint writes loads with weights_only=True, and
a file holding a pickled object is refused by load_checkpoint without running anything in it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from msa.checkpoint import CHECKPOINT_FILE, HISTORY_FILE, UnsafeCheckpointError, load_checkpoint, save_checkpoint
from msa.config import resolve_config


class _WritesMarker:
    """Unpickling this creates ``path`` (and does nothing else): proof that unpickling ran code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _trained_pieces() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A module and an AdamW whose state holds per-parameter tensors (one step taken)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_saved_checkpoint_loads_weights_only_with_optimizer_config_and_numpy_metrics(tmp_path):
    cfg = resolve_config("small", ["image.size=32"])
    model, optimizer = _trained_pieces()
    history = [{"epoch": 0, "val_mR": np.float64(12.5), "train_loss": np.float32(3.25)},
               {"epoch": np.int64(1), "val_mR": 20.0, "train_loss": 2.0}]
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, epoch=np.int64(1), cfg=cfg,
                    dataset_digest="ab" * 32, metrics=history[-1], history=history)

    # torch's own weights_only loader accepts the file: it holds only tensors, containers, numbers, strings
    raw = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert set(raw) == {"model", "optimizer", "epoch", "config", "dataset_digest", "metrics", "history"}

    state = load_checkpoint(tmp_path)
    assert state["epoch"] == 1 and type(state["epoch"]) is int
    assert state["config"] == cfg.to_dict()
    assert state["dataset_digest"] == "ab" * 32
    assert state["history"] == [{"epoch": 0, "val_mR": 12.5, "train_loss": 3.25},
                                {"epoch": 1, "val_mR": 20.0, "train_loss": 2.0}]
    assert all(type(v) in (int, float) for h in state["history"] for v in h.values())
    assert json.loads((tmp_path / HISTORY_FILE).read_text()) == state["history"]
    for key, tensor in model.state_dict().items():
        assert torch.equal(state["model"][key], tensor)
    restored = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restored.load_state_dict(state["optimizer"])  # the optimizer state round-trips (resume works)
    assert restored.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]


def test_saving_an_object_that_would_need_pickle_is_refused(tmp_path):
    model, _ = _trained_pieces()
    cfg = resolve_config("small", [])
    with pytest.raises(TypeError, match=r"checkpoint metrics\['note'\]: .*_WritesMarker is not a tensor"):
        save_checkpoint(tmp_path, model=model, optimizer=None, epoch=0, cfg=cfg, dataset_digest="0" * 64,
                        metrics={"note": _WritesMarker(tmp_path / "never")}, history=[])
    assert not (tmp_path / CHECKPOINT_FILE).exists()


def test_checkpoint_with_a_pickled_object_is_refused_and_nothing_runs(tmp_path):
    model, _ = _trained_pieces()
    marker = tmp_path / "marker-written-by-unpickling"
    directory = tmp_path / "evil"
    directory.mkdir()
    state = {"model": model.state_dict(), "optimizer": None, "epoch": 0, "config": {"preset": "small"},
             "dataset_digest": "0" * 64, "metrics": {"val_mR": _WritesMarker(marker)}, "history": []}
    torch.save(state, directory / CHECKPOINT_FILE)

    with pytest.raises(UnsafeCheckpointError) as excinfo:
        load_checkpoint(directory)
    message = str(excinfo.value)
    assert str(directory / CHECKPOINT_FILE) in message  # names the file
    assert "refused" in message and "weights_only" in message
    assert not marker.exists()  # nothing in the file ran

    # The fixture is armed: an unrestricted load does run it (and only creates the marker).
    torch.load(directory / CHECKPOINT_FILE, weights_only=False)
    assert marker.exists()


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MSA checkpoint here"):
        load_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(ValueError, match=r"checkpoint.pt: not an MSA checkpoint"):
        load_checkpoint(tmp_path)
