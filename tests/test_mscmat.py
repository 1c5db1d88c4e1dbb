"""MSCMAT: the vectorised module against the literal per-pair formula and the authors' module layout."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from msa.mscmat import MSCMAT, LayerNormFp32

SMALL_DIMS = (8, 16, 24, 32)


def make_inputs(in_dims, b, seq, d, dtype=torch.float64, seed=0, b_cap=None):
    g = torch.Generator().manual_seed(seed)
    b_cap = b if b_cap is None else b_cap
    feats = [torch.randn(b, c, generator=g, dtype=dtype) for c in in_dims]
    tokens = torch.randn(b_cap, seq, d, generator=g, dtype=dtype)
    cls = F.normalize(torch.randn(b_cap, d, generator=g, dtype=dtype), dim=-1)
    return feats, tokens, cls


@torch.no_grad()
def perturb_(module: nn.Module, seed: int = 1) -> nn.Module:
    """Move every parameter off its init (zero biases, unit LayerNorms) so each one is actually tested."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def small_model(in_dims=SMALL_DIMS, d=48, heads=4, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return perturb_(MSCMAT(in_dims, d_model=d, num_heads=heads).to(dtype))


def layer_norm(ln: nn.LayerNorm, x):
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


@torch.no_grad()
def naive_scores(model: MSCMAT, feats, tokens, cls, key_padding_mask=None):
    """Spec section 2 literally: one nn.MultiheadAttention call per (scale, image, caption)."""
    d = tokens.shape[-1]
    out = torch.empty(len(model.scales), feats[0].shape[0], tokens.shape[0], dtype=tokens.dtype)
    for k, scale in enumerate(model.scales):
        mha = nn.MultiheadAttention(d, scale.num_heads, batch_first=True).to(tokens.dtype).eval()
        mha.in_proj_weight.copy_(scale.attn_in_weight)
        mha.in_proj_bias.copy_(scale.attn_in_bias)
        mha.out_proj.weight.copy_(scale.attn_out.weight)
        mha.out_proj.bias.copy_(scale.attn_out.bias)
        for i in range(feats[k].shape[0]):
            q = scale.query_proj(feats[k][i])
            for j in range(tokens.shape[0]):
                t = layer_norm(model.ln_tokens, tokens[j])[None]
                mask = None if key_padding_mask is None else key_padding_mask[j][None]
                a = mha(layer_norm(model.ln_query, q)[None, None], t, t, key_padding_mask=mask, need_weights=False)
                out[k, i, j] = torch.sigmoid(scale.match_head((a[0][0, 0] + cls[j]) * q))
    return out


@pytest.mark.parametrize("b", [1, 3, 8])
def test_matches_naive_pair_loop(b):
    model = small_model()
    feats, tokens, cls = make_inputs(SMALL_DIMS, b, 30, 48)
    with torch.no_grad():
        got = model(feats, tokens, cls)
    torch.testing.assert_close(got, naive_scores(model, feats, tokens, cls), rtol=0, atol=1e-12)


def test_matches_naive_pair_loop_paper_size():
    dims = (256, 512, 1024, 2048)
    model = small_model(dims, d=768, heads=12)
    feats, tokens, cls = make_inputs(dims, 2, 30, 768)
    with torch.no_grad():
        got = model(feats, tokens, cls)
    torch.testing.assert_close(got, naive_scores(model, feats, tokens, cls), rtol=0, atol=1e-12)


def test_float32_agrees_with_float64_to_rounding():
    model = small_model()
    feats, tokens, cls = make_inputs(SMALL_DIMS, 5, 30, 48)
    with torch.no_grad():
        exact = model(feats, tokens, cls)
        single = model.float()([f.float() for f in feats], tokens.float(), cls.float())
    torch.testing.assert_close(single.double(), exact, rtol=0, atol=1e-5)


def test_key_padding_mask_matches_naive():
    model = small_model()
    feats, tokens, cls = make_inputs(SMALL_DIMS, 4, 30, 48)
    lengths = torch.tensor([30, 1, 12, 29])
    mask = torch.arange(30)[None, :] >= lengths[:, None]
    with torch.no_grad():
        got = model(feats, tokens, cls, key_padding_mask=mask)
        unmasked = model(feats, tokens, cls)
    torch.testing.assert_close(got, naive_scores(model, feats, tokens, cls, mask), rtol=0, atol=1e-12)
    assert not torch.allclose(got[:, :, 1:], unmasked[:, :, 1:])  # the mask changes masked captions only
    torch.testing.assert_close(got[:, :, 0], unmasked[:, :, 0], rtol=0, atol=1e-12)


class ReferenceMSCMAT(nn.Module):
    """The authors' parameter layout with a literal pair-by-pair forward (seq-first attention, as theirs)."""

    def __init__(self, in_dims, d, heads):
        super().__init__()
        self.num_scales = len(in_dims)
        for k, c in enumerate(in_dims, start=1):
            setattr(self, f"fc{k}", nn.Linear(c, d))
            setattr(self, f"cross_attn{k}", nn.MultiheadAttention(d, heads))
            setattr(self, f"match_fc{k}", nn.Linear(d, 1))
        self.ln_pre_t = nn.LayerNorm(d)
        self.ln_pre_i = nn.LayerNorm(d)
        self.ln_post = nn.LayerNorm(d)  # defined but unused, as in the reference

    def forward(self, feats, tokens, cls):
        b = tokens.shape[0]
        out = torch.empty(self.num_scales, b, b, dtype=tokens.dtype)
        for k in range(1, self.num_scales + 1):
            fc, attn, match = (getattr(self, f"{n}{k}") for n in ("fc", "cross_attn", "match_fc"))
            for i in range(b):
                q = fc(feats[k - 1][i])
                for j in range(b):
                    t = self.ln_pre_i(tokens[j])[:, None]
                    a = attn(self.ln_pre_t(q)[None, None], t, t, need_weights=False)[0][0, 0]
                    out[k - 1, i, j] = torch.sigmoid(match((a + cls[j]) * q))
        return out


def reference_module(d=48, heads=4):
    torch.manual_seed(3)
    return perturb_(ReferenceMSCMAT(SMALL_DIMS, d, heads).double(), seed=4)


def test_from_reference_state_dict_reproduces_reference_forward():
    ref = reference_module()
    model = MSCMAT.from_reference_state_dict(ref.state_dict(), num_heads=4)
    assert [s.query_proj.in_features for s in model.scales] == list(SMALL_DIMS)
    assert model.ln_query.weight.dtype == torch.float64
    feats, tokens, cls = make_inputs(SMALL_DIMS, 3, 30, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(feats, tokens, cls), ref(feats, tokens, cls), rtol=0, atol=1e-12)


def test_from_reference_state_dict_rejects_unknown_and_missing_keys():
    state = dict(reference_module().state_dict())
    with pytest.raises(ValueError, match=r"unexpected \['extra\.weight'\]"):
        MSCMAT.from_reference_state_dict({**state, "extra.weight": torch.zeros(1)}, num_heads=4)
    del state["cross_attn2.out_proj.bias"]
    with pytest.raises(ValueError, match=r"missing \['cross_attn2\.out_proj\.bias'\]"):
        MSCMAT.from_reference_state_dict(state, num_heads=4)


def test_shape_range_and_rectangular_batches():
    torch.manual_seed(0)
    model = MSCMAT(SMALL_DIMS, d_model=48, num_heads=4)
    feats, tokens, cls = make_inputs(SMALL_DIMS, 5, 30, 48, dtype=torch.float32, b_cap=3)
    out = model(feats, tokens, cls)
    assert out.shape == (4, 5, 3) and out.dtype == torch.float32
    assert ((out > 0) & (out < 1)).all()


def test_init_follows_spec():
    torch.manual_seed(0)
    d = 768
    scale = MSCMAT([64], d_model=d, num_heads=12).scales[0]
    assert scale.attn_in_weight.std().item() == pytest.approx(d**-0.5, rel=0.02)
    assert scale.attn_out.weight.std().item() == pytest.approx(d**-0.5 * 2**-0.5, rel=0.02)
    assert not scale.attn_in_bias.any() and not scale.attn_out.bias.any()


def test_gradients_reach_every_parameter_and_input():
    model = small_model(dtype=torch.float32)
    feats, tokens, cls = make_inputs(SMALL_DIMS, 3, 30, 48, dtype=torch.float32)
    for x in (*feats, tokens, cls):
        x.requires_grad_(True)
    (model(feats, tokens, cls) * torch.randn(4, 3, 3)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for x in (*feats, tokens, cls):
        assert x.grad.abs().sum() > 0


def test_layer_norm_computes_in_float32_for_half_inputs():
    torch.manual_seed(0)
    ln = perturb_(LayerNormFp32(64))
    x = (torch.randn(4, 64) * 50 + 300).bfloat16()
    got = ln(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, F.layer_norm(x.float(), (64,), ln.weight, ln.bias).bfloat16(), rtol=0, atol=0)


class LargestTensor(TorchDispatchMode):
    """Records the largest storage (in elements) any op produces, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


def test_memory_never_grows_with_pairs_times_dim():
    # Sizes chosen so every legitimate tensor (B^2*H*L scores, B*L*D projections, 3*D^2 weights)
    # is far below B^2*D, which is itself 8x below the B^2*L*D the reference builds.
    b, seq, d, heads = 32, 4, 64, 2
    model = small_model(d=d, heads=heads, dtype=torch.float32)
    feats, tokens, cls = make_inputs(SMALL_DIMS, b, seq, d, dtype=torch.float32)
    tokens.requires_grad_(True)
    tracker = LargestTensor()
    with tracker:
        model(feats, tokens, cls).sum().backward()
    assert "_softmax_backward_data" in tracker.ops  # the backward pass was observed too
    legit = max(4 * b * b * heads * seq, 3 * d * d, 3 * b * seq * d)
    assert tracker.largest <= legit < b * b * d
