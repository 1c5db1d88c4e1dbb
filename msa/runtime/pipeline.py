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
from mlflow.tracking import MlflowClient

from msa.config import MSAConfig
from msa.data import iterate_samples
from msa.evaluate import EmbeddedSplit, embed_split, evaluate_recall
from msa.metrics import RECALL_KEYS, chance_recall, chunked_ranks, named_recalls
from msa.plots import example_queries, plot_recall_curves, plot_retrieval_examples, recall_curve
from msa.runtime import tracking
from msa.runtime.datasets import DataMix
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


@dataclass
class CorpusSplit:
    """One corpus's split, embedded by a model: its name in a ``DataMix`` ("" alone), shard URLs, embeddings."""

    name: str
    urls: list[str]
    embedded: EmbeddedSplit

    def figures(self) -> dict[str, float]:
        """Recalls and the split's chance mR."""
        return {**evaluate_recall(self.embedded), "chance_mR": chance_recall(self.embedded.caption_image)["mR"]}


def evaluate_split(model: ResolvedModel, data_uri: str, split: str = "test", storage_options: dict | None = None
                   ) -> list[CorpusSplit]:
    """Embed ``split`` of every shard set ``data_uri`` names (``DataMix``) with a resolved model."""
    register_webdataset_s3(storage_options or {})
    out = []
    for corpus in DataMix.parse(data_uri).corpora:
        manifest = read_manifest(corpus.uri, storage_options)
        if split not in manifest.splits or manifest.splits[split].images == 0:
            raise ValueError(f"shard set {corpus.uri} has no {split!r} split to evaluate")
        urls = manifest.shard_urls(split)
        embedded = embed_split(
            model.model,
            urls,
            transform=model.transform,
            tokenizer=model.tokenizer,
            max_tokens=model.cfg.text.max_tokens,
            batch_size=model.cfg.train.eval_batch_size,
            device=model.device,
            num_workers=model.cfg.train.loader_workers,
        )
        out.append(CorpusSplit(corpus.name, urls, embedded))
    return out


def split_figures(model: ResolvedModel, data_uri: str, split: str = "test", storage_options: dict | None = None
                  ) -> tuple[dict[str, float], list[CorpusSplit]]:
    """Recalls and chance mR of ``split`` (per corpus and their mean for a mix, ``named_recalls``)."""
    corpora = evaluate_split(model, data_uri, split, storage_options)
    return named_recalls("", {c.name: c.figures() for c in corpora}), corpora


def evaluate_test(trained: TrainedRun, *, data_uri: str, spec: RunSpec, split: str = "test") -> dict[str, float]:
    """Evaluate the selected checkpoint on the test split once; log recalls, chance level, figures and the
    split as the run's evaluation dataset."""
    tracking.use_tracking(spec.mlflow_uri)
    tracking.log_dataset_input(trained.run_id, trained.dataset_digest, data_uri, context=split)
    model = resolve_model(trained.best_checkpoint, storage_options=spec.storage_options)
    started = time.perf_counter()
    metrics, corpora = split_figures(model, data_uri, split, spec.storage_options)
    seconds = time.perf_counter() - started
    epoch = int(model.checkpoint_epoch or 0)
    tracking.log_metrics(
        trained.run_id,
        {
            **{f"test_{k}": v for k, v in metrics.items()},
            "test_eval_seconds": seconds,
            "selected_epoch": float(epoch),
        },
        step=epoch,
    )
    for corpus in corpora:
        _log_figures(trained, corpus, model.cfg)
    return {**metrics, "selected_epoch": float(epoch)}


def _log_figures(trained: TrainedRun, corpus: CorpusSplit, cfg: MSAConfig) -> None:
    """Recall curves and retrieval examples; neither holds the full score matrix nor every image."""
    embedded, urls = corpus.embedded, corpus.urls
    i2t_rank, t2i_rank = chunked_ranks(embedded.image_emb, embedded.text_emb, embedded.caption_image)
    queries = example_queries(len(embedded.captions))
    scores = embedded.image_emb @ embedded.text_emb[queries].T
    top = scores.topk(min(5, scores.shape[0]), dim=0).indices.T.tolist()
    needed = {i for row in top for i in row}
    images = {i: s.image.convert("RGB") for i, s in enumerate(iterate_samples(urls)) if i in needed}
    with tempfile.TemporaryDirectory() as tmp:
        suffix = f"_{corpus.name}" if corpus.name else ""
        curve = plot_recall_curves(recall_curve(i2t_rank, t2i_rank), trained.history,
                                   Path(tmp) / f"recall_curves{suffix}.png",
                                   title=f"{cfg.preset} {corpus.name}".strip())
        examples = plot_retrieval_examples(
            [embedded.captions[q] for q in queries], [int(embedded.caption_image[q]) for q in queries], top, images,
            Path(tmp) / f"retrieval_examples{suffix}.png",
        )
        for path in (curve, examples):
            tracking.log_artifact(trained.run_id, path, "figures")


def publish_model(trained: TrainedRun, test_metrics: dict[str, float], *, spec: RunSpec) -> str:
    """Log the selected checkpoint as a pyfunc embedding model and register a new version, described by
    its model card (``tracking.model_card``)."""
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
    data_uri = MlflowClient().get_run(trained.run_id).data.tags["data_uri"]
    corpus = ", ".join(read_manifest(c.uri, spec.storage_options).corpus for c in DataMix.parse(data_uri).corpora)
    tracking.describe_version(version, tracking.model_card(
        version=version, cfg=model.cfg, corpus=corpus, data_uri=data_uri, dataset_digest=trained.dataset_digest,
        test=test_metrics, run_id=trained.run_id, tracking_uri=mlflow.get_tracking_uri(),
    ))
    tracking.finish_run(trained.run_id)
    return version


def trained_run_to_dict(trained: TrainedRun) -> dict[str, Any]:
    return asdict(trained)
