"""Ray Train V2 driver: DDP over WebDataset shards, checkpoints, resume, live MLflow metrics.

The per-worker loop composes the torch-only pieces (msa.data, msa.train, msa.evaluate); this module
is the only one in msa/ that imports Ray. Rank 0 evaluates validation recall each epoch, writes the
checkpoint and logs the epoch to MLflow; every rank calls ``ray.train.report`` once per epoch.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from msa.config import MSAConfig
from msa.paths import OFFLINE_ENV
from msa.train import HISTORY_FILE

@dataclass
class TrainJob:
    """Everything a training run needs, as plain data (it crosses process and node boundaries)."""

    data_uri: str
    config: dict[str, Any]
    run_name: str
    storage_path: str
    dataset_digest: str
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainOutcome:
    best_checkpoint: str  # URI or local path of the checkpoint with the best validation mR
    best_metrics: dict[str, float]
    history: list[dict[str, float]]


@dataclass
class SplitPlan:
    """Shard URLs and key filters for train and validation (val carved from train if absent)."""

    train_urls: list[str]
    val_urls: list[str]
    train_pairs: int
    carved_fraction: float | None

    def train_filter(self):
        if self.carved_fraction is None:
            return None
        from msa.data import is_carved_validation

        fraction = self.carved_fraction
        return lambda key: not is_carved_validation(key, fraction)

    def val_filter(self):
        if self.carved_fraction is None:
            return None
        from msa.data import is_carved_validation

        fraction = self.carved_fraction
        return lambda key: is_carved_validation(key, fraction)


def plan_splits(manifest, val_fraction: float) -> SplitPlan:
    train = manifest.splits.get("train")
    if train is None or train.images == 0:
        raise ValueError(f"shard set {manifest.digest[:16]} has no train split")
    val = manifest.splits.get("val")
    if val is not None and val.images > 0:
        return SplitPlan(manifest.shard_urls("train"), manifest.shard_urls("val"), train.captions, None)
    pairs = int(train.captions * (1.0 - val_fraction))
    return SplitPlan(manifest.shard_urls("train"), manifest.shard_urls("train"), pairs, val_fraction)


def train_loop_per_worker(job_dict: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from msa import tracking
    from msa.data import ImageTransform, PairBatches, pair_loader, steps_per_epoch
    from msa.encoders import build_tokenizer
    from msa.evaluate import embed_split, evaluate_recall
    from msa.model import MSAModel
    from msa.train import (
        autocast_dtype,
        build_optimizer,
        load_checkpoint,
        save_checkpoint,
        seed_everything,
        train_epoch,
        unwrap,
    )
    from shards.manifest import read_manifest
    from shards.storage import register_webdataset_s3

    job = TrainJob(**job_dict)
    cfg = MSAConfig.from_dict(job.config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    register_webdataset_s3(job.storage_options)
    manifest = read_manifest(job.data_uri, job.storage_options)
    plan = plan_splits(manifest, cfg.train.val_fraction)

    seed_everything(cfg.train.seed)
    device = ray.train.torch.get_device()
    tokenizer = build_tokenizer(cfg.text.tokenizer or cfg.text.model)
    model = ray.train.torch.prepare_model(MSAModel(cfg))
    optimizer = build_optimizer(model, cfg.optim)

    start_epoch, history = 0, []
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as directory:
            state = load_checkpoint(directory, map_location=device)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            print(f"[msa] resumed from epoch {state['epoch']} checkpoint", flush=True)

    transform = ImageTransform(cfg.image.size)
    steps = steps_per_epoch(plan.train_pairs, cfg.train.batch_size, world)
    dataset = PairBatches(
        plan.train_urls,
        transform=transform,
        tokenizer=tokenizer,
        max_tokens=cfg.text.max_tokens,
        batch_size=cfg.train.batch_size,
        steps_per_epoch=steps,
        rank=rank,
        world_size=world,
        seed=cfg.train.seed,
        key_filter=plan.train_filter(),
    )
    if rank == 0 and job.mlflow_run_id:
        tracking.use_tracking(job.mlflow_uri)

    for epoch in range(start_epoch, cfg.train.epochs):
        dataset.set_epoch(epoch)
        if epoch == start_epoch:
            urls, stride = dataset.assignment(0, max(1, cfg.train.loader_workers))
            names = ",".join(url.rsplit("/", 1)[-1] for url in urls)
            node = ray.get_runtime_context().get_node_id()[:12]
            print(
                f"[msa] rank {rank} of {world} on node {node} reads shards {names}"
                + (" (sample stride)" if stride else ""),
                flush=True,
            )
        loader = pair_loader(dataset, cfg.train.loader_workers, pin_memory=device.type == "cuda")
        stats = train_epoch(model, loader, optimizer, cfg, device)
        metrics: dict[str, float] = {"epoch": epoch, **stats.as_metrics()}
        metrics["train_pairs_per_s"] = stats.pairs_per_s * world
        if rank != 0:
            ray.train.report(metrics)
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
        print(
            f"[msa] epoch {epoch + 1}/{cfg.train.epochs} loss {stats.loss:.3f} (tri {stats.triplet:.3f} "
            f"align {stats.align:.3f} cons {stats.cons:.4f}) val mR {metrics['val_mR']:.2f} "
            f"i2t R1 {metrics['val_i2t_R1']:.1f} t2i R1 {metrics['val_t2i_R1']:.1f} "
            f"{metrics['train_pairs_per_s']:.0f} pairs/s",
            flush=True,
        )
        if job.mlflow_run_id:
            tracking.log_metrics(job.mlflow_run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(
                directory,
                model=model,
                optimizer=optimizer,
                epoch=epoch,
                cfg=cfg,
                dataset_digest=job.dataset_digest,
                metrics=metrics,
                history=history,
            )
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def run_training(job: TrainJob, ray_address: str | None = None, callbacks: list | None = None) -> TrainOutcome:
    """Fit on the Ray cluster at ``ray_address`` (or RAY_ADDRESS, else a local one) and pick the best epoch.

    ``callbacks`` go into the Train ``RunConfig`` (msa.tune passes Tune's ``TuneReportCallback``); inside
    a Tune trial Ray is already initialised, so no ``ray.init`` happens there.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        ray.init(
            address=ray_address or os.environ.get("RAY_ADDRESS"),
            runtime_env={"env_vars": {**OFFLINE_ENV, **_forwarded_env()}},
            log_to_driver=True,
        )
    cfg = MSAConfig.from_dict(job.config)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=asdict(job),
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=job.num_workers,
            use_gpu=job.use_gpu,
            resources_per_worker={"CPU": job.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=job.run_name,
            storage_path=job.storage_path,
            callbacks=list(callbacks or []),
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val_mR",
                checkpoint_score_order="max",
            ),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    candidates = result.best_checkpoints or []
    if not candidates:
        raise RuntimeError(f"training run {job.run_name} reported no checkpoint")
    checkpoint, metrics = max(candidates, key=lambda pair: pair[1].get("val_mR", float("-inf")))
    latest = result.checkpoint
    with latest.filesystem.open_input_stream(f"{latest.path}/{HISTORY_FILE}") as stream:
        history = json.loads(stream.read())
    return TrainOutcome(_checkpoint_uri(checkpoint), dict(metrics), history)


def _forwarded_env() -> dict[str, str]:
    """Credentials and endpoints the workers need, taken from the driver's environment, never logged."""
    names = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "PYTHONPATH",
    )
    return {name: os.environ[name] for name in names if name in os.environ}


def _checkpoint_uri(checkpoint) -> str:
    fs_type = type(checkpoint.filesystem).__name__
    if fs_type == "S3FileSystem":
        return f"s3://{checkpoint.path}"
    return str(Path(checkpoint.path))
