"""Training-path options and the fine-tuning recipe of msa.engine (issue 15, issue 11 item 4).

Every option changes how the step runs, never what it computes: from the same weights and batch, one
``train_step`` with the option gives the loss, the gradients and the updated weights of the plain eager
step within the tolerances below (float32 on the CPU; compiled kernels, channels_last convolutions and the
fused AdamW sum in another order). The recipe's parts (schedule, clipping, groups, learnable logit scale) are
checked on their own, and the paper preset's optimizer is shown to be exactly today's.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from msa.config import resolve_config
from msa.engine import (
    LocalCheckpoints,
    build_optimizer,
    build_schedule,
    fit,
    lr_factor,
    prepare_training,
    train_step,
)
from msa.losses import compute_loss, infonce_loss
from msa.model import MSAModel

# Tolerances of "the same result" (lr 5e-4):
# - loss: rtol 1e-4, atol 1e-5;
# - every gradient: rtol 1e-3, atol 1e-6 (float32 sums in another order);
# - every weight after one AdamW step: rtol 1e-4, atol 5e-5 = 10% of lr. Adam's first step moves each element
#   by ~lr * g / (|g| + eps) whatever the gradient's size, so an element whose gradient is near eps or at
#   float-noise level (the attention key biases' is exactly 0 in exact arithmetic: softmax ignores them) moves
#   by a visibly different fraction of lr; measured worst case 2.6% of lr (channels_last). AdamW's eps is 1e-5
#   here (not 1e-8) to keep the noise-level gradients from taking such steps at all.
RTOL, ATOL = 1e-4, 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-6
WEIGHT_RTOL, WEIGHT_ATOL = 1e-4, 5e-5
CPU = torch.device("cpu")
# The small preset at 32 px, B=8, dropout off so that every variant computes the same function.
TINY_BERT_NO_DROPOUT = ("text.config_overrides={num_hidden_layers: 2, hidden_size: 128, num_attention_heads: 2, "
                        "intermediate_size: 256, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}")
TINY = ["image.size=32", "train.batch_size=8", "optim.eps=1e-5", TINY_BERT_NO_DROPOUT]


def tiny_cfg(*overrides: str):
    return resolve_config("small", TINY + list(overrides))


def random_batch(cfg, model: MSAModel, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, n = cfg.train.batch_size, cfg.text.max_tokens
    vocab = model.text.transformer.config.vocab_size
    ids = torch.randint(1000, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[: b // 2, n // 2:] = 0
    return {"images": torch.randn(b, 3, cfg.image.size, cfg.image.size, generator=g), "input_ids": ids * mask,
            "attention_mask": mask, "image_ids": torch.arange(b)}


@pytest.fixture(scope="module")
def base_model() -> MSAModel:
    torch.manual_seed(0)
    return MSAModel(tiny_cfg()).train()


def one_step(cfg, base: MSAModel) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One train_step from a copy of ``base`` through prepare_training: (loss, gradients, updated weights)."""
    model = copy.deepcopy(base)
    step_model, optimizer = prepare_training(cfg, model, CPU)
    parts = train_step(step_model, random_batch(cfg, model), optimizer, cfg, CPU)
    params = dict(model.named_parameters())
    return (parts["total"].item(), {n: p.grad.contiguous().clone() for n, p in params.items()},
            {n: p.detach().contiguous().clone() for n, p in params.items()})


def assert_same_step(a, b) -> None:
    (loss_a, grads_a, weights_a), (loss_b, grads_b, weights_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=RTOL, abs=ATOL)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=GRAD_RTOL, atol=GRAD_ATOL,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
        torch.testing.assert_close(weights_a[name], weights_b[name], rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_close_step(a, b, lr: float, rel_l2: float = 0.05) -> None:
    """A compiled step against the eager one, per tensor in relative L2 norm (not per element).

    Inductor fuses BatchNorm's backward and sums in another order; through the CNN stem's normalisations the
    cancellation amplifies that to ~3% (relative L2, measured: bn1.bias 2.8%, conv stem 0.2-0.3%) of a
    gradient, and Adam's first step turns any element whose gradient is at noise level into a full +-lr
    move, so element-wise bounds do not hold while the step is the same. Gradients are compared in relative
    L2, updates by the share of elements that moved apart. Tensors whose gradient is at
    noise level (the attention key biases': exactly 0 in exact arithmetic) are left out.
    """
    (loss_a, grads_a, weights_a), (loss_b, grads_b, weights_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=RTOL, abs=ATOL)
    compared = 0
    for name, grad in grads_b.items():
        if grad.norm() < 1e-5:
            continue
        compared += 1
        assert (grads_a[name] - grad).norm() <= rel_l2 * grad.norm(), f"grad of {name}"
        # Adam's first step is ~ +-lr per element: at most 1% of elements (noise-level gradients) may differ
        # by more than 10% of lr (measured: 0.1% of the stem's conv1.3.weight, none elsewhere)
        moved_apart = ((weights_a[name] - weights_b[name]).abs() > 0.1 * lr).float().mean().item()
        assert moved_apart <= 0.01, f"update of {name}: {moved_apart:.2%} of elements differ by > 10% of lr"
    assert compared > 0.8 * len(grads_b)  # measured: 111 of 129 tensors have a gradient above noise level


def test_eager_step_is_deterministic(base_model):
    """The reference the options are compared with: two plain steps agree exactly."""
    a, b = one_step(tiny_cfg(), base_model), one_step(tiny_cfg(), base_model)
    assert a[0] == b[0] and all(torch.equal(a[2][n], b[2][n]) and torch.equal(a[1][n], b[1][n]) for n in a[2])


def test_channels_last_step_equals_contiguous(base_model):
    cfg = tiny_cfg("train.channels_last=true")
    model = copy.deepcopy(base_model)
    prepare_training(cfg, model, CPU)
    convs = [p for p in model.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert_same_step(one_step(cfg, base_model), one_step(tiny_cfg(), base_model))


def test_fused_adamw_step_equals_default(base_model):
    """torch >= 2.4 has the fused AdamW on the CPU too, so train.fused_adamw is allowed there."""
    cfg = tiny_cfg("train.fused_adamw=true")
    _, optimizer = prepare_training(cfg, copy.deepcopy(base_model), CPU)
    assert optimizer.defaults["fused"] is True
    assert_same_step(one_step(cfg, base_model), one_step(tiny_cfg(), base_model))


def test_prefetch_and_tf32_are_no_ops_on_cpu(base_model):
    cfg = tiny_cfg("train.prefetch=true", "train.tf32=true")
    assert_same_step(one_step(cfg, base_model), one_step(tiny_cfg(), base_model))


@pytest.mark.slow
def test_compiled_step_equals_eager(base_model):
    """torch.compile (inductor) on the CPU: minutes of compilation on two cores, hence slow."""
    cfg = tiny_cfg("train.compile=true")
    model = copy.deepcopy(base_model)
    step_model, _ = prepare_training(cfg, model, CPU)
    assert step_model is not model and getattr(step_model, "_orig_mod", None) is model
    assert_close_step(one_step(cfg, base_model), one_step(tiny_cfg(), base_model), cfg.optim.lr)


def test_compiled_model_gets_a_static_graph_per_batch_size():
    """Training's batches have one shape; a bench measuring several batch sizes must time each size's own
    static graph (as training compiles it), not the dynamic-shape graph dynamo would build on the second."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    step_model, _ = prepare_training(tiny_cfg("train.compile=true"), torch.nn.Linear(4, 4), CPU)
    for batch_size in (2, 3, 4):
        step_model(torch.randn(batch_size, 4))
    assert counters["stats"]["unique_graphs"] == 3  # 2 with dynamic shapes: sizes 3 and 4 share one graph
    torch._dynamo.reset()


# --- the fine-tuning recipe --------------------------------------------------------------------------------

def test_schedule_warmup_then_cosine():
    optim = resolve_config("small", ["optim.schedule=cosine", "optim.warmup_steps=10"]).optim
    total = 110
    assert lr_factor(0, optim, total) == pytest.approx(0.1)  # step s of the warm-up runs at (s + 1) / 10
    assert lr_factor(9, optim, total) == pytest.approx(1.0)  # last warm-up step: the full lr
    assert lr_factor(10, optim, total) == pytest.approx(1.0)  # cosine starts at 1
    assert lr_factor(60, optim, total) == pytest.approx(0.5)  # half way through the decay
    assert lr_factor(110, optim, total) == pytest.approx(0.0, abs=1e-12)
    assert 0 < lr_factor(109, optim, total) < 1e-3
    constant = resolve_config("small", ["optim.warmup_steps=4"]).optim
    assert [lr_factor(s, constant, 100) for s in (0, 3, 50, 99)] == [0.25, 1.0, 1.0, 1.0]


def test_schedule_is_stepped_per_optimiser_step(base_model):
    cfg = tiny_cfg("optim.schedule=cosine", "optim.warmup_steps=2", "optim.head_lr=1e-3")
    model = copy.deepcopy(base_model)
    step_model, optimizer = prepare_training(cfg, model, CPU)
    schedule = build_schedule(optimizer, cfg.optim, total_steps=4)
    bases = schedule.base_lrs  # the config's lrs; the groups already run at step 0's
    assert sorted(set(bases)) == [5e-4, 1e-3]
    seen = []
    for step in range(4):
        seen.append([g["lr"] for g in optimizer.param_groups])
        train_step(step_model, random_batch(cfg, model, seed=step), optimizer, cfg, CPU, schedule)
    for step, lrs in enumerate(seen):
        assert lrs == pytest.approx([b * lr_factor(step, cfg.optim, 4) for b in bases])
    assert seen[0] == pytest.approx([b / 2 for b in bases])
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.0] * len(bases), abs=1e-12)
    # "constant" with no warm-up is the paper's fixed lr: no schedule at all
    assert build_schedule(optimizer, tiny_cfg().optim, total_steps=4) is None


def test_resumed_schedule_continues_from_the_config_lrs(base_model):
    """A resumed optimizer carries scheduled lrs; the schedule must restart from the base ones, not those."""
    cfg = tiny_cfg("optim.schedule=cosine", "optim.warmup_steps=2")
    model = copy.deepcopy(base_model)
    step_model, optimizer = prepare_training(cfg, model, CPU)
    schedule = build_schedule(optimizer, cfg.optim, total_steps=6)
    for step in range(3):
        train_step(step_model, random_batch(cfg, model, seed=step), optimizer, cfg, CPU, schedule)
    saved = copy.deepcopy(optimizer.state_dict())
    _, resumed = prepare_training(cfg, copy.deepcopy(base_model), CPU)
    resumed.load_state_dict(saved)
    again = build_schedule(resumed, cfg.optim, total_steps=6, start_step=3)
    assert again.base_lrs == schedule.base_lrs == [cfg.optim.lr]
    assert [g["lr"] for g in resumed.param_groups] == pytest.approx([g["lr"] for g in optimizer.param_groups])


def test_grad_clip_bounds_the_total_norm(base_model, monkeypatch):
    cfg = tiny_cfg("optim.grad_clip=0.01")
    model = copy.deepcopy(base_model)
    step_model, optimizer = prepare_training(cfg, model, CPU)
    norms = []

    def record(*args, **kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())

    optimizer.register_step_pre_hook(lambda opt, args, kwargs: record())
    train_step(step_model, random_batch(cfg, model), optimizer, cfg, CPU)
    unclipped = tiny_cfg()
    model2 = copy.deepcopy(base_model)
    step2, optimizer2 = prepare_training(unclipped, model2, CPU)
    optimizer2.register_step_pre_hook(lambda opt, args, kwargs: norms.append(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"]
                                              if p.grad is not None])).item()))
    train_step(step2, random_batch(unclipped, model2), optimizer2, unclipped, CPU)
    clipped, raw = norms
    assert raw > 0.01  # the clip is active here
    assert clipped == pytest.approx(0.01, rel=1e-3)


def test_parameter_groups(base_model):
    cfg = tiny_cfg("optim.no_decay_norm_bias=true", "optim.head_lr=1e-3", "loss.learn_temperature=true",
                   "loss.w_infonce=1.0")
    torch.manual_seed(0)
    model = MSAModel(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(group_of) == len(names)  # every parameter in exactly one group
    for name, p in names.items():
        g = group_of[id(p)]
        no_decay = p.ndim < 2 or name == "logit_scale"
        assert g["weight_decay"] == (0.0 if no_decay else cfg.optim.weight_decay), name
        assert g["lr"] == (1e-3 if name.startswith("mscmat.") else cfg.optim.lr), name
    assert any("norm" in n.lower() and group_of[id(p)]["weight_decay"] == 0 for n, p in names.items())
    assert group_of[id(model.logit_scale)]["weight_decay"] == 0


def test_paper_preset_optimizer_is_todays_single_group_adamw():
    cfg = resolve_config("paper")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, cfg.optim, fused=cfg.train.fused_adamw)
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["params"] == list(model.parameters())
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (1e-5, 0.1, (0.9, 0.999), 1e-8)
    assert not group["fused"] and not group["foreach"]
    assert build_schedule(optimizer, cfg.optim, total_steps=1000) is None
    assert cfg.optim.grad_clip is None and cfg.train.bf16 is False


def test_learnable_logit_scale_receives_a_gradient():
    cfg = tiny_cfg("loss.w_infonce=1.0", "loss.learn_temperature=true", "loss.infonce_temperature=0.05")
    torch.manual_seed(0)
    model = MSAModel(cfg).train()
    assert model.logit_scale.item() == pytest.approx(math.log(20))
    batch = random_batch(cfg, model)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    assert out.logit_scale.item() == pytest.approx(20)
    parts = compute_loss(out, cfg.loss)
    assert parts["infonce"].item() == pytest.approx(
        infonce_loss(out.image_emb, out.text_emb, 0.05).item(), rel=1e-5)
    parts["total"].backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0
    with torch.no_grad():  # clamped at 100 like CLIP's
        model.logit_scale.fill_(math.log(500))
    assert model(batch["images"], batch["input_ids"], batch["attention_mask"]).logit_scale.item() == \
        pytest.approx(100)
    assert "logit_scale" not in dict(MSAModel(tiny_cfg()).named_parameters())  # off by default


# --- every option on: trains as the plain path does ---------------------------------------------------------

@pytest.mark.slow
def test_fit_with_every_option_on_learns(learning_shards, tmp_path):
    """As tests/test_model.py's fit test, with every training-path option that runs on the CPU and the recipe."""
    from msa.data import ImageTransform, plan_splits
    from msa.encoders import build_tokenizer
    from msa.evaluate import embed_split, evaluate_recall
    from shards.manifest import read_manifest

    cfg = resolve_config("small", [
        "image.size=32", "train.batch_size=16", "optim.lr=1e-3", "train.epochs=4", "train.loader_workers=0",
        "train.keep_checkpoints=1", "train.compile=true", "train.channels_last=true", "train.fused_adamw=true",
        "train.prefetch=true", "train.tf32=true", "optim.schedule=cosine", "optim.warmup_steps=2",
        "optim.grad_clip=50", "optim.no_decay_norm_bias=true", "optim.head_lr=1e-3", "loss.w_infonce=1.0",
        "loss.learn_temperature=true"])
    manifest = read_manifest(learning_shards)
    plan = plan_splits(manifest, cfg.train.val_fraction)
    urls = manifest.shard_urls("train")
    tokenizer, transform = build_tokenizer(cfg), ImageTransform(cfg.image.size)

    def recall(model) -> float:
        return evaluate_recall(embed_split(model, urls, transform=transform, tokenizer=tokenizer,
                                           max_tokens=31))["mR"]

    torch.manual_seed(cfg.train.seed)
    before = recall(MSAModel(cfg))
    sink = LocalCheckpoints(tmp_path / "ckpt", keep=1)
    result = fit(cfg, plan, sink=sink, dataset_digest=manifest.digest, log=lambda line: None)
    first = result.history[0]
    assert first["train_compile_seconds"] > 0 and "train_compile_seconds" not in result.history[1]
    assert "train_infonce" in first
    from msa.checkpoint import load_checkpoint, model_from_checkpoint

    restored, _ = model_from_checkpoint(load_checkpoint(sink.best()[0]))
    after = recall(restored)
    assert after > before + 10, (before, after)
