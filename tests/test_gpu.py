"""The CUDA paths of the model library: skipped without a GPU (CI has none), run on a GPU machine as
``pytest tests/test_gpu.py``.

The CPU suite never reaches what only a GPU runs: bf16 autocast, the side-stream prefetch, pinned-memory
loaders, fused AdamW's CUDA kernel, CUDA convolutions and attention. These tests check that the GPU computes
what the CPU computes (the paper model in fp32, embeddings of a split) and that a GPU run with every training
option on learns, and that its checkpoint rebuilds on the CPU.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
OFFLINE_PAPER = ["image.weights=null", "text.weights=null", "text.tokenizer=packaged:all-minilm-l6-v2"]


@pytest.fixture
def exact_fp32():
    """CUDA matmuls and convolutions in full fp32 (no TF32), as on the CPU; restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@torch.no_grad()
def test_paper_model_on_the_gpu_computes_the_cpu_scores_and_loss(exact_fp32):
    """Spec section 3's forward (ResNet-50 stages, BERT, MSCMAT) and loss, fp32, B=8 at 224 px."""
    torch.manual_seed(1)
    cfg = resolve_config("paper", OFFLINE_PAPER)
    model = MSAModel(cfg).eval()
    captions = [f"a {c} area with {n} buildings near a river" for c in ("green", "dense") for n in range(4)]
    ids, mask = tokenize(build_tokenizer(cfg.text.tokenizer), captions, cfg.text.max_tokens)
    images = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8)
    on_cpu = model(images, ids, mask)
    model.to(CUDA)
    on_gpu = model(images.to(CUDA), ids.to(CUDA), mask.to(CUDA))
    for name in ("image_emb", "text_emb", "scores"):
        torch.testing.assert_close(getattr(on_gpu, name).cpu(), getattr(on_cpu, name), rtol=1e-3, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    cpu_loss, gpu_loss = compute_loss(on_cpu, cfg.loss), compute_loss(on_gpu, cfg.loss)
    for term, value in cpu_loss.items():
        assert gpu_loss[term].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-4), term


@pytest.mark.slow
def test_fit_on_the_gpu_with_every_option_learns_and_rebuilds_on_the_cpu(learning_shards, tmp_path, exact_fp32):
    """bf16, torch.compile, channels_last, fused AdamW, side-stream prefetch and two pinned loader workers;
    the best checkpoint loads on the CPU, and embedding a split there or on the GPU gives the same embeddings
    (rtol 1e-3) and recalls (within a point)."""
    cfg = resolve_config("small", [
        "image.size=32", "train.batch_size=16", "optim.lr=1e-3", "train.epochs=4", "train.loader_workers=2",
        "train.keep_checkpoints=1", "train.bf16=true", "train.compile=true", "train.channels_last=true",
        "train.fused_adamw=true", "train.prefetch=true", "optim.schedule=cosine", "optim.warmup_steps=2",
        "optim.grad_clip=50", "loss.w_infonce=1.0", "loss.learn_temperature=true"])
    manifest = read_manifest(learning_shards)
    urls = manifest.shard_urls("train")
    tokenizer, transform = build_tokenizer(cfg), ImageTransform(cfg.image.size)

    def embedded(model, device):
        return embed_split(model.to(device), urls, transform=transform, tokenizer=tokenizer, max_tokens=31,
                           device=device, num_workers=2)

    torch.manual_seed(cfg.train.seed)
    before = evaluate_recall(embedded(MSAModel(cfg), CUDA))["mR"]
    sink = LocalCheckpoints(tmp_path / "ckpt", keep=1)
    result = fit(cfg, plan_splits(manifest, cfg.train.val_fraction), sink=sink, dataset_digest=manifest.digest,
                 device=CUDA, log=lambda line: None)
    first, last = result.history[0], result.history[-1]
    assert first["train_compile_seconds"] > 0
    assert last["train_loss"] < first["train_loss"], (first["train_loss"], last["train_loss"])

    restored, _ = model_from_checkpoint(load_checkpoint(sink.best()[0]))
    assert next(restored.parameters()).device.type == "cpu"
    on_cpu, on_gpu = embedded(restored, torch.device("cpu")), embedded(restored, CUDA)
    torch.testing.assert_close(on_gpu.image_emb.cpu(), on_cpu.image_emb, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(on_gpu.text_emb.cpu(), on_cpu.text_emb, rtol=1e-3, atol=1e-4)
    after = evaluate_recall(on_gpu)["mR"]
    assert after == pytest.approx(evaluate_recall(on_cpu)["mR"], abs=1.0)
    assert after > before + 10, (before, after)
