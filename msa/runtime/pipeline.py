"""The steps a training flow runs, as plain functions of URIs and ids (Prefect wraps them as tasks).

verify shards -> train (Ray) -> evaluate the selected checkpoint on test once -> publish model.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow

from msa.config import MSAConfig
from msa.data import iterate_samples
from msa.evaluate import EmbeddedSplit, embed_split, evaluate_recall
from msa.metrics import RECALL_KEYS, chance_recall, chunked_ranks
from msa.plots import example_queries, plot_recall_curves, plot_retrieval_examples, recall_curve
from msa.runtime import tracking
from msa.runtime.ray_train import TrainJob, TrainOutcome, run_training
from msa.runtime.resolver import ResolvedModel, resolve_model
from msa.runtime.spec import RunSpec
from shards.manifest import read_manifest
from shards.storage import register_webdataset_s3


@dataclass
class TrainedRun:
    run_id: str
    run_name: str
    dataset_digest: str
    best_checkpoint: str
    best_val: dict[str, float]
    history: list[dict[str, float]]


def train(
    cfg: MSAConfig,
    spec: RunSpec,
    *,
    data_uri: str,
    dataset_digest: str,
    run_name: str,
    parent_run_id: str | None = None,
) -> TrainedRun:
    """One MLflow run around one Ray Train fit; the run is marked FAILED if training raises."""
    spec = spec.model_copy(update={"mlflow_uri": tracking.use_tracking(spec.mlflow_uri)})
    run_id = tracking.start_training_run(
        cfg, spec, dataset_digest=dataset_digest, data_uri=data_uri, run_name=run_name, parent_run_id=parent_run_id
    )
    job = TrainJob(data_uri=data_uri, config=cfg.to_dict(), run_name=run_name, dataset_digest=dataset_digest,
                   run=spec.model_dump(), mlflow_run_id=run_id)
    try:
        outcome: TrainOutcome = run_training(job)
    except BaseException:
        tracking.finish_run(run_id, "FAILED")
        raise
    tracking.log_metrics(run_id, {f"best_val_{k}": outcome.best_metrics[f"val_{k}"] for k in RECALL_KEYS}, step=0)
    return TrainedRun(run_id, run_name, dataset_digest, outcome.best_checkpoint, outcome.best_metrics, outcome.history)


def evaluate_split(model: ResolvedModel, data_uri: str, split: str = "test", storage_options: dict | None = None
                   ) -> tuple[EmbeddedSplit, list[str]]:
    """Embed ``split`` of the shard set at ``data_uri`` with a resolved model; returns it and its shard URLs."""
    register_webdataset_s3(storage_options or {})
    manifest = read_manifest(data_uri, storage_options)
    if split not in manifest.splits or manifest.splits[split].images == 0:
        raise ValueError(f"shard set {data_uri} has no {split!r} split to evaluate")
    urls = manifest.shard_urls(split)
    embedded = embed_split(
        model.model,
        urls,
        transform=model.transform,
        tokenizer=model.tokenizer,
        max_tokens=model.cfg.text.max_tokens,
        batch_size=model.cfg.train.eval_batch_size,
        device=model.device,
    )
    return embedded, urls


def evaluate_test(trained: TrainedRun, *, data_uri: str, spec: RunSpec, split: str = "test") -> dict[str, float]:
    """Evaluate the selected checkpoint on the test split once; log recalls, chance level and figures."""
    tracking.use_tracking(spec.mlflow_uri)
    model = resolve_model(trained.best_checkpoint, storage_options=spec.storage_options)
    started = time.perf_counter()
    embedded, urls = evaluate_split(model, data_uri, split, spec.storage_options)
    metrics = evaluate_recall(embedded)
    chance = chance_recall(embedded.caption_image)
    seconds = time.perf_counter() - started
    epoch = int(model.checkpoint_epoch or 0)
    tracking.log_metrics(
        trained.run_id,
        {
            **{f"test_{k}": v for k, v in metrics.items()},
            "test_chance_mR": chance["mR"],
            "test_eval_seconds": seconds,
            "selected_epoch": float(epoch),
        },
        step=epoch,
    )
    _log_figures(trained, embedded, urls, model.cfg)
    return {**metrics, "chance_mR": chance["mR"], "selected_epoch": float(epoch)}


def _log_figures(trained: TrainedRun, embedded: EmbeddedSplit, urls: list[str], cfg: MSAConfig) -> None:
    """Recall curves and retrieval examples; neither holds the full score matrix nor every image."""
    i2t_rank, t2i_rank = chunked_ranks(embedded.image_emb, embedded.text_emb, embedded.caption_image)
    queries = example_queries(len(embedded.captions))
    scores = embedded.image_emb @ embedded.text_emb[queries].T
    top = scores.topk(min(5, scores.shape[0]), dim=0).indices.T.tolist()
    needed = {i for row in top for i in row}
    images = {i: s.image.convert("RGB") for i, s in enumerate(iterate_samples(urls)) if i in needed}
    with tempfile.TemporaryDirectory() as tmp:
        curve = plot_recall_curves(recall_curve(i2t_rank, t2i_rank), trained.history,
                                   Path(tmp) / "recall_curves.png", title=cfg.preset)
        examples = plot_retrieval_examples(
            [embedded.captions[q] for q in queries], [int(embedded.caption_image[q]) for q in queries], top, images,
            Path(tmp) / "retrieval_examples.png",
        )
        for path in (curve, examples):
            tracking.log_artifact(trained.run_id, path, "figures")


def publish_model(trained: TrainedRun, test_metrics: dict[str, float], *, spec: RunSpec) -> str:
    """Log the selected checkpoint as a pyfunc embedding model and register a new version."""
    from msa.checkpoint import save_checkpoint
    from msa.runtime.serving import log_pyfunc_model

    tracking.use_tracking(spec.mlflow_uri)
    model = resolve_model(trained.best_checkpoint, "cpu", storage_options=spec.storage_options)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_dir, tokenizer_dir = Path(tmp) / "checkpoint", Path(tmp) / "tokenizer"
        save_checkpoint(checkpoint_dir, model=model.model, optimizer=None, epoch=int(model.checkpoint_epoch or 0),
                        cfg=model.cfg, dataset_digest=trained.dataset_digest, metrics=dict(trained.best_val),
                        history=trained.history)
        model.tokenizer.save_pretrained(tokenizer_dir)
        with mlflow.start_run(run_id=trained.run_id):
            model_uri = log_pyfunc_model(checkpoint_dir, tokenizer_dir, model.embed_dim)
    version = tracking.register_model(
        model_uri, trained.dataset_digest, {k: v for k, v in test_metrics.items() if k in RECALL_KEYS}
    )
    tracking.finish_run(trained.run_id)
    return version


def trained_run_to_dict(trained: TrainedRun) -> dict[str, Any]:
    return asdict(trained)
