"""The assembled model: the paper preset's loss at initialisation, and a short run that learns."""

from __future__ import annotations

import math

import pytest
import torch

from msa.config import resolve_config
from msa.data import ImageTransform, PairBatches, pair_loader, steps_per_epoch
from msa.encoders import build_tokenizer, tokenize
from msa.evaluate import embed_split, evaluate_recall
from msa.model import MSAModel, compute_loss
from msa.train import build_optimizer, load_checkpoint, model_from_checkpoint, save_checkpoint, train_epoch
from shards.manifest import read_manifest
from shards.synth import generate_corpus
from shards.writer import write_shards

OFFLINE_PAPER = ["image.weights=null", "text.weights=null", "text.tokenizer=packaged:all-minilm-l6-v2"]


@torch.no_grad()
def test_paper_preset_total_loss_at_initialisation_is_in_the_spec_band():
    """Spec 3: ~240 at init for B=32; the four-scale alignment term sits between its floor and log(32)."""
    torch.manual_seed(1)
    cfg = resolve_config("paper", OFFLINE_PAPER)
    assert (cfg.image.backbone, cfg.text.model, cfg.optim.lr, cfg.train.batch_size) == (
        "resnet50.tv_in1k", "bert-base-uncased", 1e-5, 32
    )
    model = MSAModel(cfg).train()
    assert model.image.stage_dims == (256, 512, 1024, 2048) and model.text.hidden_size == 768
    captions = [f"a {c} area with {n} buildings near a river" for c in ("green", "dense", "bare", "sandy") for n in range(8)]
    ids, mask = tokenize(build_tokenizer(cfg.text.tokenizer), captions, cfg.text.max_tokens)
    out = model(torch.randn(32, 3, 224, 224), ids, mask)
    parts = compute_loss(out, cfg.loss)
    # Sigmoid scores used as logits bound each scale's CE to [log(1 + 31/e), log(1 + 31e)].
    assert 4 * math.log(1 + 31 / math.e) <= parts["align"].item() <= 4 * math.log(1 + 31 * math.e)
    assert 15 * parts["align"].item() == pytest.approx(15 * 4 * math.log(32), rel=0.02)  # ~208, near uniform
    assert 225 <= parts["total"].item() <= 260, {k: v.item() for k, v in parts.items()}


def recall_of(model, urls, transform, tokenizer) -> float:
    return evaluate_recall(embed_split(model, urls, transform=transform, tokenizer=tokenizer, max_tokens=31))["mR"]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("learn")
    annotations = generate_corpus(root / "corpus", splits={"train": 48}, image_size=32, seed=11)
    write_shards(annotations, root / "corpus" / "images", str(root / "shards"), corpus="synth", shard_size=16, progress=False)
    return str(root / "shards")


def test_short_training_run_lowers_the_loss_and_raises_recall(tiny_corpus, tmp_path):
    torch.manual_seed(0)
    cfg = resolve_config("small", ["image.size=32", "train.batch_size=16", "optim.lr=1e-3"])
    urls = read_manifest(tiny_corpus).shard_urls("train")
    tokenizer = build_tokenizer(cfg.text.model)
    transform = ImageTransform(cfg.image.size)
    model = MSAModel(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    batches = PairBatches(
        urls, transform=transform, tokenizer=tokenizer, max_tokens=31, batch_size=16,
        steps_per_epoch=steps_per_epoch(48 * 5, 16, 1),
    )

    before = recall_of(model, urls, transform, tokenizer)
    losses = []
    for epoch in range(4):
        batches.set_epoch(epoch)
        losses.append(train_epoch(model, pair_loader(batches, 0), optimizer, cfg, torch.device("cpu")).loss)
    after = recall_of(model, urls, transform, tokenizer)
    assert losses[-1] < 0.8 * losses[0], losses
    assert after > before + 10, (before, after)

    save_checkpoint(tmp_path, model=model, optimizer=optimizer, epoch=3, cfg=cfg, dataset_digest="d" * 64,
                    metrics={"mR": after}, history=[])
    restored, restored_cfg = model_from_checkpoint(load_checkpoint(tmp_path))
    assert restored_cfg == cfg
    assert recall_of(restored, urls, transform, tokenizer) == pytest.approx(after)
