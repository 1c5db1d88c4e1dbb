"""The assembled model: the paper preset's loss at initialisation, and a short run that learns."""

from __future__ import annotations

import math

import pytest
import torch

from msa.checkpoint import load_checkpoint, model_from_checkpoint
from msa.config import resolve_config
from msa.data import ImageTransform, plan_splits
from msa.encoders import build_tokenizer, tokenize
from msa.engine import LocalCheckpoints, fit
from msa.evaluate import embed_split, evaluate_recall
from msa.losses import compute_loss
from msa.model import MSAModel
from shards.manifest import read_manifest

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
    captions = [f"a {c} area with {n} buildings near a river"
                for c in ("green", "dense", "bare", "sandy") for n in range(8)]
    ids, mask = tokenize(build_tokenizer(cfg.text.tokenizer), captions, cfg.text.max_tokens)
    out = model(torch.randn(32, 3, 224, 224), ids, mask)
    parts = compute_loss(out, cfg.loss)
    # Sigmoid scores used as logits bound each scale's CE to [log(1 + 31/e), log(1 + 31e)].
    assert 4 * math.log(1 + 31 / math.e) <= parts["align"].item() <= 4 * math.log(1 + 31 * math.e)
    assert 15 * parts["align"].item() == pytest.approx(15 * 4 * math.log(32), rel=0.02)  # ~208, near uniform
    assert 225 <= parts["total"].item() <= 260, {k: v.item() for k, v in parts.items()}


def recall_of(model, urls, transform, tokenizer) -> float:
    return evaluate_recall(embed_split(model, urls, transform=transform, tokenizer=tokenizer, max_tokens=31))["mR"]


def test_fit_learns_keeps_the_best_checkpoints_and_resumes(learning_shards, tmp_path):
    """The in-process engine, no Ray: loss falls, recall rises, best checkpoints kept, a second call resumes."""
    cfg = resolve_config("small", ["image.size=32", "train.batch_size=16", "optim.lr=1e-3", "train.epochs=4",
                                   "train.loader_workers=0", "train.keep_checkpoints=1"])
    manifest = read_manifest(learning_shards)
    plan = plan_splits(manifest, cfg.train.val_fraction)
    urls = manifest.shard_urls("train")
    tokenizer, transform = build_tokenizer(cfg), ImageTransform(cfg.image.size)
    torch.manual_seed(cfg.train.seed)
    before = recall_of(MSAModel(cfg), urls, transform, tokenizer)  # fit seeds the same init

    sink = LocalCheckpoints(tmp_path / "ckpt", keep=cfg.train.keep_checkpoints)
    lines: list[str] = []
    result = fit(cfg, plan, sink=sink, dataset_digest=manifest.digest, log=lines.append)
    losses = [h["train_loss"] for h in result.history]
    assert [int(h["epoch"]) for h in result.history] == [0, 1, 2, 3]
    assert losses[-1] < 0.8 * losses[0], losses
    assert {"train_triplet", "train_align", "train_cons"} <= set(result.history[0])  # every named loss term
    best_dir, best = sink.best()
    assert best["val_mR"] == max(h["val_mR"] for h in result.history) == result.best["val_mR"]
    kept = sorted(p.name for p in (tmp_path / "ckpt").glob("epoch-*"))
    assert kept == sorted({best_dir.name, "epoch-0003"})  # the best, plus the newest to resume from

    restored, restored_cfg = model_from_checkpoint(load_checkpoint(best_dir))
    assert restored_cfg == cfg
    after = recall_of(restored, urls, transform, tokenizer)
    assert after > before + 10, (before, after)

    longer = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 5})})
    resumed = fit(longer, plan, sink=sink, dataset_digest=manifest.digest, log=lines.append)
    assert "[msa] resumed from epoch 3 checkpoint" in lines
    assert [int(h["epoch"]) for h in resumed.history] == [0, 1, 2, 3, 4]
    assert resumed.history[:4] == result.history


@torch.no_grad()
def test_uint8_images_are_normalised_on_the_device_as_the_float_path_did():
    """encode_image(uint8) == encode_image of the float pixels the loader used to normalise, in every format."""
    cfg = resolve_config("small", ["image.size=32"])
    torch.manual_seed(0)
    model = MSAModel(cfg).eval()
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(cfg.image.mean).view(3, 1, 1), torch.tensor(cfg.image.std).view(3, 1, 1)
    normalised = (pixels.float().div(255.0) - mean) / std
    v, scales = model.encode_image(pixels)
    v_float, scales_float = model.encode_image(normalised)
    torch.testing.assert_close(v, v_float, atol=1e-5, rtol=0)
    for ours, theirs in zip(scales, scales_float, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    channels_last = pixels.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.normalize(channels_last)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, normalised, atol=1e-6, rtol=0)

    state = model.state_dict()
    assert not [k for k in state if k.startswith("normalize.")]  # checkpoints from before still load strictly
    MSAModel(cfg).load_state_dict(state, strict=True)
