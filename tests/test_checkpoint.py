"""Checkpoint files hold plain data only: what save_checkpoint writes loads with weights_only=True, and
a file holding a pickled object is refused by load_checkpoint without running anything in it. A damaged
checkpoint is recognised, and resume (LocalCheckpoints, the Ray path) falls back to the newest good one."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from msa.checkpoint import (
    CHECKPOINT_FILE,
    HISTORY_FILE,
    MANIFEST_FILE,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from msa.config import resolve_config
from msa.engine import LocalCheckpoints


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


# Resume from the newest readable checkpoint: a corrupt one is skipped, named in one log line, and kept.

def _three_local_checkpoints(directory: Path) -> tuple[LocalCheckpoints, list[dict]]:
    """epoch-0000..0002 written through LocalCheckpoints.end_epoch (all kept), each with its own weights."""
    cfg = resolve_config("small", ["image.size=32"])
    model, optimizer = _trained_pieces()
    sink, history = LocalCheckpoints(directory, keep=3), []
    for epoch in range(3):
        with torch.no_grad():
            model[0].weight.fill_(float(epoch))
        metrics = {"epoch": epoch, "val_mR": 10.0 + epoch, "finished_at": 1000.0 + epoch}
        history.append(metrics)
        sink.end_epoch(metrics, lambda d, m=metrics: save_checkpoint(
            d, model=model, optimizer=optimizer, epoch=m["epoch"], cfg=cfg, dataset_digest="0" * 64, metrics=m,
            history=list(history)))
    return sink, history


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated tensor file": (CHECKPOINT_FILE, _truncate, r"checkpoint.pt has \d+ bytes, \d+ recorded"),
    "garbled history JSON": (HISTORY_FILE, lambda p: p.write_text('[{"epoch": 2, "val_'),
                             r"history.json (has|does not match)"),
    "missing tensor file": (CHECKPOINT_FILE, Path.unlink, r"checkpoint.pt is missing"),
    "flipped byte in a tensor": (CHECKPOINT_FILE, _flip_middle_byte,
                                 r"checkpoint.pt does not match its recorded sha256"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_resume_skips_a_corrupt_newest_checkpoint_says_so_and_keeps_it(tmp_path, caplog, corruption):
    name, damage, problem = CORRUPTIONS[corruption]
    sink, history = _three_local_checkpoints(tmp_path)
    damage(tmp_path / "epoch-0002" / name)

    with caplog.at_level(logging.WARNING, logger="msa.checkpoint"):
        state = sink.resume_state(torch.device("cpu"))

    assert state is not None and state["epoch"] == 1 and state["history"] == history[:2]
    assert torch.equal(state["model"]["0.weight"], torch.full((3, 4), 1.0))
    lines = [r.getMessage() for r in caplog.records if r.name == "msa.checkpoint"]
    assert len(lines) == 1, lines
    assert re.fullmatch(rf"checkpoint epoch-0002 unreadable \({problem}.*; kept as epoch-0002.unreadable\): "
                        r"resuming from epoch-0001", lines[0]), lines[0]
    # never deleted: moved aside with its files, out of the way of the epoch trained again
    kept = tmp_path / "epoch-0002.unreadable"
    assert kept.is_dir() and not (tmp_path / "epoch-0002").exists()
    assert [p.name for p in sink._epochs()] == ["epoch-0000", "epoch-0001"]
    assert sink.best()[0].name == "epoch-0001"


def test_with_no_readable_checkpoint_training_starts_from_scratch_and_says_so(tmp_path, caplog):
    sink, _ = _three_local_checkpoints(tmp_path)
    for epoch in range(3):
        _truncate(tmp_path / f"epoch-{epoch:04d}" / CHECKPOINT_FILE)
    with caplog.at_level(logging.WARNING, logger="msa.checkpoint"):
        assert sink.resume_state(torch.device("cpu")) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "msa.checkpoint"]
    assert [line.split(" (")[0] for line in lines[:3]] == [
        "checkpoint epoch-0002 unreadable", "checkpoint epoch-0001 unreadable", "checkpoint epoch-0000 unreadable"]
    assert lines[3] == "no readable checkpoint among 3: training starts from scratch"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"epoch-{e:04d}.unreadable" for e in range(3)]


def test_checkpoint_without_manifest_loads_and_a_cut_one_is_corrupt_not_unsafe(tmp_path):
    """Checkpoints written before the manifest: no digest to check, but a cut archive is still recognised."""
    model, optimizer = _trained_pieces()
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, epoch=0, cfg=resolve_config("small", []),
                    dataset_digest="0" * 64, metrics={}, history=[])
    (tmp_path / MANIFEST_FILE).unlink()
    assert load_checkpoint(tmp_path)["epoch"] == 0
    _truncate(tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint.pt is not a torch archive"):
        load_checkpoint(tmp_path)


def test_ray_resume_falls_back_to_the_newest_readable_reported_checkpoint(tmp_path):
    """The Ray path's choice, on real ray.train Checkpoints in a run directory laid out as Ray Train writes it."""
    from ray.train import Checkpoint
    from ray.train.v2.api.reported_checkpoint import ReportedCheckpoint, ReportedCheckpointStatus

    from msa.runtime.ray_train import resume_from

    _three_local_checkpoints(tmp_path / "local")
    reported = []
    for epoch, stamp in enumerate(["10-00-00.000001", "10-00-01.000001", "10-00-02.000001"]):
        directory = tmp_path / "run" / f"checkpoint_2026-11-28_{stamp}"
        shutil.copytree(tmp_path / "local" / f"epoch-{epoch:04d}", directory)
        reported.append(ReportedCheckpoint(Checkpoint.from_directory(directory), {"epoch": epoch},
                                           ReportedCheckpointStatus.COMMITTED))
    listed, lines = [], []

    def all_reported():
        listed.append(True)
        return list(reversed(reported))  # order as Ray keeps it is not relied on: newest epoch first

    assert resume_from(reported[2].checkpoint, all_reported, "cpu", lines.append)["epoch"] == 2
    assert not listed and not lines  # the latest loads: the others are not even listed

    _flip_middle_byte(Path(reported[2].checkpoint.path) / CHECKPOINT_FILE)
    (Path(reported[1].checkpoint.path) / HISTORY_FILE).write_text("{")
    assert resume_from(reported[2].checkpoint, all_reported, "cpu", lines.append)["epoch"] == 0
    assert [line.split(" (")[0] for line in lines] == ["checkpoint checkpoint_2026-11-28_10-00-02.000001 unreadable",
                                                       "checkpoint checkpoint_2026-11-28_10-00-01.000001 unreadable"]
    assert all(line.endswith("resuming from checkpoint_2026-11-28_10-00-00.000001") for line in lines)
    assert all(Path(r.checkpoint.path, CHECKPOINT_FILE).exists() for r in reported)  # nothing deleted
