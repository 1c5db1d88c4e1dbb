"""The in-process training engine: one step, one epoch, and ``fit`` (epochs, validation, checkpoints, resume).

Everything that trains a model goes through here: the Ray Train worker calls ``fit`` with its rank
and a sink that reports to Ray; tests, benchmarks and notebooks call it with ``LocalCheckpoints``.
The engine knows nothing of Ray or MLflow: what happens at the end of an epoch is the sink's job.
"""

from __future__ import annotations

import math
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from msa.checkpoint import (
    HISTORY_FILE,
    CorruptCheckpointError,
    load_checkpoint,
    load_newest,
    read_history,
    save_checkpoint,
)
from msa.config import MSAConfig, OptimConfig
from msa.data import ImageTransform, PairBatches, SplitPlan, pair_loader, steps_per_epoch
from msa.encoders import build_tokenizer
from msa.evaluate import embed_split, evaluate_recall
from msa.losses import compute_loss
from msa.metrics import named_recalls
from msa.model import MSAModel


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]] | None:
    """AdamW parameter groups for ``optim.no_decay_norm_bias`` / ``optim.head_lr``; None: one group (the paper).

    No decay: parameters with ndim < 2 (norm weights, biases, a logit scale) and any ``logit_scale``. Head:
    ``model.mscmat``'s parameters, at ``head_lr``. Empty groups are left out.
    """
    if not cfg.no_decay_norm_bias and cfg.head_lr is None:
        return None
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = cfg.head_lr is not None and name.startswith("mscmat.")
        no_decay = cfg.no_decay_norm_bias and (p.ndim < 2 or "logit_scale" in name)
        groups.setdefault((head, no_decay), []).append(p)
    return [{"params": params, "lr": cfg.head_lr if head else cfg.lr,
             "weight_decay": 0.0 if no_decay else cfg.weight_decay}
            for (head, no_decay), params in sorted(groups.items())]


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (spec section 4): over all parameters with one lr unless ``cfg`` asks for parameter groups.

    ``fused``: ``AdamW(fused=True)`` (train.fused_adamw; CUDA, and the CPU in torch >= 2.4); otherwise
    torch's default implementation. Pass the bare model (not a DDP or compile wrapper): group names are
    read off its parameter names.
    """
    groups = parameter_groups(model, cfg)
    return torch.optim.AdamW(
        model.parameters() if groups is None else groups,
        lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps,
        **({"fused": True} if fused else {}),
    )


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The multiplier of each group's lr at optimiser step ``step`` (0-based) of ``total_steps``.

    Linear warm-up (step s: (s + 1) / warmup_steps), then 1 ("constant") or a cosine from 1 at the end of the
    warm-up to 0 at ``total_steps`` ("cosine").
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class LRSchedule:
    """Sets every group's lr to its base lr x ``lr_factor(step)``; ``step()`` after each optimiser step.

    Stateless apart from the step counter, so a resumed run starts it at ``start_step`` (epochs done x
    steps per epoch). Base lrs are kept in each group as ``initial_lr`` (as torch's schedulers do), so they
    travel in the optimizer's state dict and a resumed optimizer, whose ``lr`` is a scheduled one, keeps them.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, start_step: int = 0):
        self.optimizer, self.cfg, self.total_steps = optimizer, cfg, total_steps
        self.base_lrs = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self.set_step(start_step)

    def set_step(self, step: int) -> None:
        self.step_count = step
        factor = lr_factor(step, self.cfg, self.total_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        self.set_step(self.step_count + 1)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                   start_step: int = 0) -> LRSchedule | None:
    """The lr schedule ``cfg`` asks for, or None for the paper's fixed lr ("constant", no warm-up)."""
    if cfg.schedule == "constant" and cfg.warmup_steps == 0:
        return None
    return LRSchedule(optimizer, cfg, total_steps, start_step)


def set_tf32(cfg: MSAConfig, device: torch.device) -> None:
    """``train.tf32`` for the matmuls and cuDNN convolutions of an fp32 run on CUDA; nothing elsewhere."""
    if device.type == "cuda" and autocast_dtype(cfg, device) is None:
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32


def prepare_training(
    cfg: MSAConfig,
    model: nn.Module,
    device: torch.device | str,
    wrap: Callable[[nn.Module], nn.Module] = lambda model: model,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The one place the training path is set up from ``cfg.train``: ``(step_model, optimizer)``.

    ``model`` (bare, on ``device``) is put in channels_last (``train.channels_last``) and handed to ``wrap``
    (e.g. a DDP wrapper); the optimizer is built over its parameters (``train.fused_adamw``, the optim
    section's groups); ``step_model`` is the wrapped model, ``torch.compile``d (static shapes) with ``train.compile``.
    TF32 is set for fp32 CUDA runs (``train.tf32``). ``fit`` and ``msa.bench`` both train through this and
    ``train_step``, so the benchmark times the step that trains.
    """
    device = torch.device(device)
    set_tf32(cfg, device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim, fused=cfg.train.fused_adamw)
    step_model = wrap(model)
    if cfg.train.compile:
        # Static shapes: training batches are full and padded to max_tokens, so every step has one shape, and a
        # second shape (the bench's next batch size) compiles a graph of its own instead of a dynamic-shape one.
        step_model = torch.compile(step_model, dynamic=False)
    return step_model, optimizer


def autocast_dtype(cfg: MSAConfig, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if cfg.train.bf16 and device.type == "cuda" else None


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    cfg: MSAConfig,
    device: torch.device,
    schedule: LRSchedule | None = None,
) -> dict[str, torch.Tensor]:
    """One optimiser step on one batch (``model`` may be DDP-wrapped or compiled); returns the detached loss terms.

    Images travel as uint8 and are normalised by the model (``MSAModel.normalize``) on the device, in the
    batch's memory format: channels_last with ``train.channels_last``. Gradients are clipped to ``optim.grad_clip``
    (total norm) before the step; ``schedule`` (if any) moves the lr on after it.
    """
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if cfg.train.channels_last:
        batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
    dtype = autocast_dtype(cfg, device)
    with torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    parts = compute_loss(out, cfg.loss, batch["image_ids"])
    optimizer.zero_grad(set_to_none=True)
    parts["total"].backward()
    if cfg.optim.grad_clip is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    optimizer.step()
    if schedule is not None:
        schedule.step()
    return {name: value.detach() for name, value in parts.items()}


def prefetch_to(batches: Iterable[dict[str, torch.Tensor]], device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """``batches`` copied to ``device`` one ahead, on a CUDA side stream, while the current step runs.

    The copies are non-blocking (pinned host memory makes them asynchronous); the compute stream waits for
    each batch before using it. Anywhere but CUDA the batches pass through unchanged.
    """
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)

    def send(batch):
        with torch.cuda.stream(stream):
            return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    it = iter(batches)
    ahead = next(it, None)
    ahead = None if ahead is None else send(ahead)
    while ahead is not None:
        torch.cuda.current_stream(device).wait_stream(stream)
        current = ahead
        for value in current.values():
            value.record_stream(torch.cuda.current_stream(device))
        nxt = next(it, None)
        ahead = None if nxt is None else send(nxt)
        yield current


@dataclass
class EpochStats:
    losses: dict[str, float]  # "total" and every named term of the objective, batch means
    steps: int
    pairs_per_s: float
    compile_seconds: float | None = None  # a compiled run's first step (compilation), left out of pairs_per_s

    def as_metrics(self, prefix: str = "train_") -> dict[str, float]:
        named = {("loss" if k == "total" else k): v for k, v in self.losses.items()}
        out = {**{f"{prefix}{k}": float(v) for k, v in named.items()},
               f"{prefix}steps": float(self.steps), f"{prefix}pairs_per_s": self.pairs_per_s}
        if self.compile_seconds is not None:
            out[f"{prefix}compile_seconds"] = self.compile_seconds
        return out

    def describe(self) -> str:
        terms = " ".join(f"{k} {v:.4g}" for k, v in self.losses.items() if k != "total")
        return f"loss {self.losses['total']:.3f} ({terms})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    cfg: MSAConfig,
    device: torch.device,
    progress=None,
    *,
    schedule: LRSchedule | None = None,
    time_first_step: bool = False,
) -> EpochStats:
    """One pass of ``train_step``; loss sums stay on the device until the end of the epoch.

    ``time_first_step`` (a compiled model's first epoch): the first step, where compilation happens, is
    timed on its own (``compile_seconds``) and left out of ``pairs_per_s``. With ``train.prefetch`` the
    next batch is copied to a CUDA device while the step runs.
    """
    model.train()
    totals: dict[str, torch.Tensor] = {}
    steps = pairs = 0
    compile_seconds = None
    if cfg.train.prefetch:
        batches = prefetch_to(batches, device)
    start = time.perf_counter()
    for batch in batches:
        parts = train_step(model, batch, optimizer, cfg, device, schedule)
        for name, value in parts.items():
            totals[name] = totals.get(name, 0) + value.double()
        steps += 1
        if time_first_step and steps == 1:
            _sync(device)
            compile_seconds = time.perf_counter() - start
            start = time.perf_counter()
        else:
            pairs += batch["images"].shape[0]
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{parts['total'].item():.2f}")
    _sync(device)
    elapsed = time.perf_counter() - start
    if steps == 0:
        raise RuntimeError("the epoch yielded no batches")
    means = {name: float(total) / steps for name, total in totals.items()}
    return EpochStats(means, steps=steps, pairs_per_s=pairs / max(elapsed, 1e-9), compile_seconds=compile_seconds)


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
    """Checkpoints in ``directory/epoch-NNNN``: the ``keep`` best by validation mR plus the newest (to resume).

    Resume takes the newest readable one (``msa.checkpoint.load_newest``); an unreadable one is renamed
    ``epoch-NNNN.unreadable`` (kept for inspection, out of the way of the epoch that is trained again).
    """

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def _epochs(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("epoch-*")
                      if re.fullmatch(r"epoch-\d+", p.name) and (p / HISTORY_FILE).exists())

    def resume_state(self, device: torch.device) -> dict[str, Any] | None:
        def load(path: Path) -> dict[str, Any]:
            try:
                return load_checkpoint(path, map_location=device)
            except CorruptCheckpointError as exc:
                kept, n = path.with_name(f"{path.name}.unreadable"), 1
                while kept.exists():
                    n += 1
                    kept = path.with_name(f"{path.name}.unreadable-{n}")
                path.rename(kept)
                raise CorruptCheckpointError(path, f"{exc.problem}; kept as {kept.name}") from None

        return load_newest((p.name, lambda p=p: load(p)) for p in reversed(self._epochs()))

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
        return path, read_history(path)[-1]

    @staticmethod
    def _val_mR(path: Path) -> float:
        return read_history(path)[-1].get("val_mR", float("-inf"))


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # rank 0: one entry per epoch

    @property
    def best(self) -> dict[str, float]:
        return max(self.history, key=lambda m: m.get("val_mR", float("-inf")))


def fit(
    cfg: MSAConfig,
    plan: SplitPlan | Sequence[SplitPlan],
    *,
    sink: EpochSink,
    dataset_digest: str = "",
    device: torch.device | str = "cpu",
    dist: Distributed | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
    checkpoint_config: MSAConfig | None = None,
) -> FitResult:
    """Train ``cfg`` on ``plan`` for ``cfg.train.epochs``, resuming from ``sink`` when it has a checkpoint.

    Every rank trains on its share of the shards; rank 0 also evaluates validation recall after each
    epoch and hands the sink a checkpoint writer. Returns rank 0's per-epoch history. Several plans
    (joint training) are mixed into one stream by their weights and validated one by one
    (``val_<name>_<key>``); the unprefixed ``val_<key>`` is then their mean. Checkpoints record
    ``checkpoint_config`` (default ``cfg``): the runtime builds from node-local copies of shared weights
    (``msa.runtime.weights``) and records the shared URIs, so a checkpoint rebuilds on any node.
    """
    plans = [plan] if isinstance(plan, SplitPlan) else list(plan)
    dist = dist or Distributed()
    device = torch.device(device)
    seed_everything(cfg.train.seed)
    tokenizer = build_tokenizer(cfg)
    model = MSAModel(cfg).to(device)
    step_model, optimizer = prepare_training(cfg, model, device, wrap=dist.prepare_model)

    start_epoch, history = 0, []
    state = sink.resume_state(device)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if dist.rank == 0:
            log(f"[msa] resumed from epoch {state['epoch']} checkpoint")

    transform = ImageTransform.from_config(cfg)
    steps = steps_per_epoch(round(sum(p.epoch_pairs for p in plans)), cfg.train.batch_size, dist.world_size)
    dataset = PairBatches(
        sources=[p.train_source() for p in plans],
        transform=transform,
        tokenizer=tokenizer,
        max_tokens=cfg.text.max_tokens,
        batch_size=cfg.train.batch_size,
        steps_per_epoch=steps,
        rank=dist.rank,
        world_size=dist.world_size,
        seed=cfg.train.seed,
    )
    schedule = build_schedule(optimizer, cfg.optim, steps * cfg.train.epochs, start_step=steps * start_epoch)
    for epoch in range(start_epoch, cfg.train.epochs):
        dataset.set_epoch(epoch)
        if epoch == start_epoch:
            for p, (urls, stride) in zip(plans, dataset.assignment(0, max(1, cfg.train.loader_workers))):
                names = ",".join(url.rsplit("/", 1)[-1] for url in urls)
                log(f"[msa] rank {dist.rank} of {dist.world_size}{dist.where} reads "
                    f"{p.name + ' ' if p.name else ''}shards {names}" + (" (sample stride)" if stride else ""))
        loader = pair_loader(dataset, cfg.train.loader_workers, pin_memory=device.type == "cuda")
        stats = train_epoch(step_model, loader, optimizer, cfg, device, schedule=schedule,
                            time_first_step=cfg.train.compile and epoch == start_epoch)
        metrics: dict[str, float] = {"epoch": epoch, **stats.as_metrics()}
        metrics["train_pairs_per_s"] = stats.pairs_per_s * dist.world_size
        if dist.rank != 0:
            sink.end_epoch(metrics, None)
            continue
        started = time.perf_counter()
        per_corpus = {
            p.name: evaluate_recall(embed_split(
                model,
                p.val_urls,
                transform=transform,
                tokenizer=tokenizer,
                max_tokens=cfg.text.max_tokens,
                batch_size=cfg.train.eval_batch_size,
                device=device,
                key_filter=p.val_filter(),
                autocast_dtype=autocast_dtype(cfg, device),
                num_workers=cfg.train.loader_workers,
            ))
            for p in plans
        }
        metrics.update(named_recalls("val", per_corpus))
        metrics["val_seconds"] = time.perf_counter() - started
        metrics["finished_at"] = time.time()  # wall clock: shows which epochs ran before a restart
        history.append(metrics)
        log(f"[msa] epoch {epoch + 1}/{cfg.train.epochs} {stats.describe()} val mR {metrics['val_mR']:.2f} "
            f"i2t R1 {metrics['val_i2t_R1']:.1f} t2i R1 {metrics['val_t2i_R1']:.1f} "
            f"{metrics['train_pairs_per_s']:.0f} pairs/s")

        def write(directory: Path, epoch: int = epoch, metrics: dict = metrics) -> None:
            save_checkpoint(directory, model=model, optimizer=optimizer, epoch=epoch, cfg=checkpoint_config or cfg,
                            dataset_digest=dataset_digest, metrics=metrics, history=history)

        sink.end_epoch(metrics, write)
    return FitResult(history)
