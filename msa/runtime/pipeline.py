"""The steps a training flow runs, as plain functions of URIs and ids (Prefect wraps them as tasks).

verify shards -> train (Ray) -> evaluate the selected checkpoint on test once -> publish model.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from msa import tracking
from msa.config import MSAConfig
from msa.data import ImageTransform, iterate_samples
from msa.driver import TrainJob, TrainOutcome, run_training
from msa.encoders import build_tokenizer
from msa.evaluate import EmbeddedSplit, embed_split, evaluate_recall
from msa.metrics import chance_recall
from msa.plots import plot_recall_curves, plot_retrieval_examples, recall_curve
from msa.train import CHECKPOINT_FILE, load_checkpoint, model_from_checkpoint
from shards.manifest import read_manifest, verify_shards
from shards.storage import open_url, register_webdataset_s3

RECALL_KEYS = ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "mR")


@dataclass
class TrainedRun:
    run_id: str
    run_name: str
    dataset_digest: str
    best_checkpoint: str
    best_val: dict[str, float]
    history: list[dict[str, float]]


def verify_dataset(data_uri: str, storage_options: dict | None = None) -> str:
    """Re-hash every shard against the manifest; the dataset digest when all is well."""
    report = verify_shards(data_uri, storage_options)
    if not report.ok:
        raise ValueError(f"shard set {data_uri} failed verification: " + "; ".join(report.problems))
    return read_manifest(data_uri, storage_options).digest


def train(
    cfg: MSAConfig,
    *,
    data_uri: str,
    dataset_digest: str,
    run_name: str,
    storage_path: str,
    num_workers: int = 2,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 0,
    ray_address: str | None = None,
    mlflow_uri: str | None = None,
    storage_options: dict | None = None,
    parent_run_id: str | None = None,
) -> TrainedRun:
    """One MLflow run around one Ray Train fit; the run is marked FAILED if training raises."""
    mlflow_uri = tracking.use_tracking(mlflow_uri)
    run_id = tracking.start_training_run(
        cfg,
        dataset_digest=dataset_digest,
        data_uri=data_uri,
        run_name=run_name,
        extra_params={"num_workers": num_workers, "use_gpu": use_gpu},
        parent_run_id=parent_run_id,
    )
    job = TrainJob(
        data_uri=data_uri,
        config=cfg.to_dict(),
        run_name=run_name,
        storage_path=storage_path,
        dataset_digest=dataset_digest,
        num_workers=num_workers,
        use_gpu=use_gpu,
        cpus_per_worker=cpus_per_worker,
        max_failures=max_failures,
        mlflow_uri=mlflow_uri,
        mlflow_run_id=run_id,
        storage_options=storage_options or {},
    )
    try:
        outcome: TrainOutcome = run_training(job, ray_address)
    except BaseException:
        tracking.finish_run(run_id, "FAILED")
        raise
    tracking.log_metrics(run_id, {f"best_val_{k}": outcome.best_metrics[f"val_{k}"] for k in RECALL_KEYS}, step=0)
    return TrainedRun(run_id, run_name, dataset_digest, outcome.best_checkpoint, outcome.best_metrics, outcome.history)


def fetch_checkpoint(checkpoint_uri: str, into: Path, storage_options: dict | None = None) -> Path:
    """Local copy of a checkpoint directory (local path or s3://)."""
    into.mkdir(parents=True, exist_ok=True)
    with open_url(f"{checkpoint_uri.rstrip('/')}/{CHECKPOINT_FILE}", "rb", storage_options) as src:
        with open(into / CHECKPOINT_FILE, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return into


def evaluate_test(
    trained: TrainedRun,
    *,
    data_uri: str,
    mlflow_uri: str | None = None,
    storage_options: dict | None = None,
    split: str = "test",
) -> dict[str, float]:
    """Evaluate the selected checkpoint on the test split once; log recalls, chance level and figures."""
    tracking.use_tracking(mlflow_uri)
    register_webdataset_s3(storage_options or {})
    manifest = read_manifest(data_uri, storage_options)
    if split not in manifest.splits or manifest.splits[split].images == 0:
        raise ValueError(f"shard set {data_uri} has no {split!r} split to evaluate")
    urls = manifest.shard_urls(split)
    with tempfile.TemporaryDirectory() as tmp:
        state = load_checkpoint(fetch_checkpoint(trained.best_checkpoint, Path(tmp), storage_options))
    model, cfg = model_from_checkpoint(state)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    tokenizer = build_tokenizer(cfg.text.tokenizer or cfg.text.model)
    started = time.perf_counter()
    embedded = embed_split(
        model,
        urls,
        transform=ImageTransform(cfg.image.size),
        tokenizer=tokenizer,
        max_tokens=cfg.text.max_tokens,
        batch_size=cfg.train.eval_batch_size,
        device=device,
    )
    metrics = evaluate_recall(embedded)
    chance = chance_recall(embedded.caption_image)
    seconds = time.perf_counter() - started
    tracking.log_metrics(
        trained.run_id,
        {
            **{f"test_{k}": v for k, v in metrics.items()},
            "test_chance_mR": chance["mR"],
            "test_eval_seconds": seconds,
            "selected_epoch": float(state["epoch"]),
        },
        step=int(state["epoch"]),
    )
    _log_figures(trained, embedded, urls, cfg)
    return {**metrics, "chance_mR": chance["mR"], "selected_epoch": float(state["epoch"])}


def _log_figures(trained: TrainedRun, embedded: EmbeddedSplit, urls: list[str], cfg: MSAConfig) -> None:
    sims = embedded.similarities()
    with tempfile.TemporaryDirectory() as tmp:
        curve = plot_recall_curves(
            recall_curve(sims, embedded.caption_image),
            trained.history,
            Path(tmp) / "recall_curves.png",
            title=cfg.preset,
        )
        images = [s.image.convert("RGB") for s in iterate_samples(urls)]
        examples = plot_retrieval_examples(
            sims, embedded.caption_image, embedded.captions, images, Path(tmp) / "retrieval_examples.png"
        )
        for path in (curve, examples):
            tracking.log_artifact(trained.run_id, path, "figures")


def publish_model(
    trained: TrainedRun,
    test_metrics: dict[str, float],
    *,
    mlflow_uri: str | None = None,
    storage_options: dict | None = None,
) -> str:
    """Log the selected checkpoint as a pyfunc embedding model and register a new version."""
    tracking.use_tracking(mlflow_uri)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_dir = fetch_checkpoint(trained.best_checkpoint, Path(tmp) / "checkpoint", storage_options)
        state = load_checkpoint(checkpoint_dir)
        cfg = MSAConfig.from_dict(state["config"])
        dim = int(state["model"]["image.out.weight"].shape[0])
        tokenizer_dir = Path(tmp) / "tokenizer"
        build_tokenizer(cfg.text.tokenizer or cfg.text.model).save_pretrained(tokenizer_dir)
        from msa.serving import log_pyfunc_model

        with mlflow.start_run(run_id=trained.run_id):
            model_uri = log_pyfunc_model(checkpoint_dir, tokenizer_dir, dim)
    version = tracking.register_model(
        model_uri, trained.dataset_digest, {k: v for k, v in test_metrics.items() if k in RECALL_KEYS}
    )
    tracking.finish_run(trained.run_id)
    return version


def trained_run_to_dict(trained: TrainedRun) -> dict[str, Any]:
    return asdict(trained)
