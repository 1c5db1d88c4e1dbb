"""The in-process training engine: one step, one epoch, and ``fit`` (epochs, validation, checkpoints, resume).

Everything that trains a model goes through here: the Ray Train worker calls ``fit`` with its rank
and a sink that reports to Ray; tests, benchmarks and notebooks call it with ``LocalCheckpoints``.
The engine knows nothing of Ray or MLflow: what happens at the end of an epoch is the sink's job.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch
from torch import nn

from msa.checkpoint import HISTORY_FILE, load_checkpoint, save_checkpoint, unwrap
from msa.config import MSAConfig, OptimConfig
from msa.data import ImageTransform, PairBatches, SplitPlan, pair_loader, steps_per_epoch
from msa.encoders import build_tokenizer
from msa.evaluate import embed_split, evaluate_recall
from msa.losses import compute_loss
from msa.model import MSAModel


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over all parameters with one lr, no schedule (spec section 4)."""
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps
    )


def autocast_dtype(cfg: MSAConfig, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if cfg.train.bf16 and device.type == "cuda" else None


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    cfg: MSAConfig,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One optimiser step on one batch (``model`` may be DDP-wrapped); returns the detached loss terms."""
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    dtype = autocast_dtype(cfg, device)
    with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    parts = compute_loss(out, cfg.loss, batch["image_ids"])
    optimizer.zero_grad(set_to_none=True)
    parts["total"].backward()
    optimizer.step()
    return {name: value.detach() for name, value in parts.items()}


@dataclass
class EpochStats:
    losses: dict[str, float]  # "total" and every named term of the objective, batch means
    steps: int
    pairs_per_s: float

    def as_metrics(self, prefix: str = "train_") -> dict[str, float]:
        named = {("loss" if k == "total" else k): v for k, v in self.losses.items()}
        return {**{f"{prefix}{k}": float(v) for k, v in named.items()},
                f"{prefix}steps": float(self.steps), f"{prefix}pairs_per_s": self.pairs_per_s}

    def describe(self) -> str:
        terms = " ".join(f"{k} {v:.4g}" for k, v in self.losses.items() if k != "total")
        return f"loss {self.losses['total']:.3f} ({terms})"


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    cfg: MSAConfig,
    device: torch.device,
    progress=None,
) -> EpochStats:
    """One pass of ``train_step``; loss sums stay on the device until the end of the epoch."""
    model.train()
    totals: dict[str, torch.Tensor] = {}
    steps = pairs = 0
    start = time.perf_counter()
    for batch in batches:
        parts = train_step(model, batch, optimizer, cfg, device)
        for name, value in parts.items():
            totals[name] = totals.get(name, 0) + value.double()
        steps += 1
        pairs += batch["images"].shape[0]
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{parts['total'].item():.2f}")
    elapsed = time.perf_counter() - start
    if steps == 0:
        raise RuntimeError("the epoch yielded no batches")
    means = {name: float(total) / steps for name, total in totals.items()}
    return EpochStats(means, steps=steps, pairs_per_s=pairs / max(elapsed, 1e-9))


@dataclass
class Distributed:
    """Where this process sits in a data-parallel job; single process by default."""

    rank: int = 0
    world_size: int = 1
    prepare_model: Callable[[nn.Module], nn.Module] = lambda model: model  # e.g. a DDP wrapper
    where: str = ""  # printed after "rank r of w", e.g. " on node 3f2a..."


class EpochSink(Protocol):
    """What ``fit`` does at the edges of an epoch: where a run resumes from and where epochs go."""

    def resume_state(self, device: torch.device) -> dict[str, Any] | None: ...

    def end_epoch(self, metrics: dict[str, float], write_checkpoint: Callable[[Path], None] | None) -> None:
        """Every rank calls this once per epoch; rank 0 passes ``write_checkpoint(directory)``."""


class LocalCheckpoints:
    """Checkpoints in ``directory/epoch-NNNN``: the ``keep`` best by validation mR plus the newest (to resume)."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def _epochs(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("epoch-*") if (p / HISTORY_FILE).exists())

    def resume_state(self, device: torch.device) -> dict[str, Any] | None:
        epochs = self._epochs()
        return load_checkpoint(epochs[-1], map_location=device) if epochs else None

    def end_epoch(self, metrics: dict[str, float], write_checkpoint: Callable[[Path], None] | None) -> None:
        if write_checkpoint is None:
            return
        write_checkpoint(self.directory / f"epoch-{int(metrics['epoch']):04d}")
        epochs = self._epochs()
        keep = set(sorted(epochs, key=self._val_mR, reverse=True)[: self.keep]) | {epochs[-1]}
        for stale in set(epochs) - keep:
            shutil.rmtree(stale)

    def best(self) -> tuple[Path, dict[str, float]]:
        path = max(self._epochs(), key=self._val_mR)
        return path, json.loads((path / HISTORY_FILE).read_text())[-1]

    @staticmethod
    def _val_mR(path: Path) -> float:
        return json.loads((path / HISTORY_FILE).read_text())[-1].get("val_mR", float("-inf"))


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # rank 0: one entry per epoch

    @property
    def best(self) -> dict[str, float]:
        return max(self.history, key=lambda m: m.get("val_mR", float("-inf")))


def fit(
    cfg: MSAConfig,
    plan: SplitPlan,
    *,
    sink: EpochSink,
    dataset_digest: str = "",
    device: torch.device | str = "cpu",
    dist: Distributed | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> FitResult:
    """Train ``cfg`` on ``plan`` for ``cfg.train.epochs``, resuming from ``sink`` when it has a checkpoint.

    Every rank trains on its share of the shards; rank 0 also evaluates validation recall after each
    epoch and hands the sink a checkpoint writer. Returns rank 0's per-epoch history.
    """
    dist = dist or Distributed()
    device = torch.device(device)
    seed_everything(cfg.train.seed)
    tokenizer = build_tokenizer(cfg)
    model = dist.prepare_model(MSAModel(cfg).to(device))
    optimizer = build_optimizer(model, cfg.optim)

    start_epoch, history = 0, []
    state = sink.resume_state(device)
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if dist.rank == 0:
            log(f"[msa] resumed from epoch {state['epoch']} checkpoint")

    transform = ImageTransform.from_config(cfg)
    dataset = PairBatches(
        plan.train_urls,
        transform=transform,
        tokenizer=tokenizer,
        max_tokens=cfg.text.max_tokens,
        batch_size=cfg.train.batch_size,
        steps_per_epoch=steps_per_epoch(plan.train_pairs, cfg.train.batch_size, dist.world_size),
        rank=dist.rank,
        world_size=dist.world_size,
        seed=cfg.train.seed,
        key_filter=plan.train_filter(),
    )
    for epoch in range(start_epoch, cfg.train.epochs):
        dataset.set_epoch(epoch)
        if epoch == start_epoch:
            urls, stride = dataset.assignment(0, max(1, cfg.train.loader_workers))
            names = ",".join(url.rsplit("/", 1)[-1] for url in urls)
            log(f"[msa] rank {dist.rank} of {dist.world_size}{dist.where} reads shards {names}"
                + (" (sample stride)" if stride else ""))
        loader = pair_loader(dataset, cfg.train.loader_workers, pin_memory=device.type == "cuda")
        stats = train_epoch(model, loader, optimizer, cfg, device)
        metrics: dict[str, float] = {"epoch": epoch, **stats.as_metrics()}
        metrics["train_pairs_per_s"] = stats.pairs_per_s * dist.world_size
        if dist.rank != 0:
            sink.end_epoch(metrics, None)
            continue
        started = time.perf_counter()
        val = embed_split(
            unwrap(model),
            plan.val_urls,
            transform=transform,
            tokenizer=tokenizer,
            max_tokens=cfg.text.max_tokens,
            batch_size=cfg.train.eval_batch_size,
            device=device,
            key_filter=plan.val_filter(),
            autocast_dtype=autocast_dtype(cfg, device),
        )
        metrics.update({f"val_{k}": v for k, v in evaluate_recall(val).items()})
        metrics["val_seconds"] = time.perf_counter() - started
        metrics["finished_at"] = time.time()  # wall clock: shows which epochs ran before a restart
        history.append(metrics)
        log(f"[msa] epoch {epoch + 1}/{cfg.train.epochs} {stats.describe()} val mR {metrics['val_mR']:.2f} "
            f"i2t R1 {metrics['val_i2t_R1']:.1f} t2i R1 {metrics['val_t2i_R1']:.1f} "
            f"{metrics['train_pairs_per_s']:.0f} pairs/s")

        def write(directory: Path, epoch: int = epoch, metrics: dict = metrics) -> None:
            save_checkpoint(directory, model=model, optimizer=optimizer, epoch=epoch, cfg=cfg,
                            dataset_digest=dataset_digest, metrics=metrics, history=history)

        sink.end_epoch(metrics, write)
    return FitResult(history)
