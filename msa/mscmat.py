"""MSCMAT: the multi-scale cross-modal alignment transformer that scores every image/caption pair per scale.

It computes the reference's per-pair function (spec section 2) without building the B^2 pairs: keys and
values are projected once per caption, queries once per image, and the [B, B, D] attention output is never
formed; its contribution to the score is folded into the match head (see ``ScaleAlignment.forward``).
Memory is O(B^2 * heads * tokens).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm that normalises in (at least) float32, so half-precision inputs keep exact statistics."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class ScaleAlignment(nn.Module):
    """One scale's weights: image query projection, one-query cross-attention, and the Lin(D->1) match head."""

    def __init__(self, in_dim: int, d_model: int, num_heads: int):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.query_proj = nn.Linear(in_dim, d_model)
        self.attn_in_weight = nn.Parameter(torch.empty(3 * d_model, d_model))  # rows: query, key, value
        self.attn_in_bias = nn.Parameter(torch.empty(3 * d_model))
        self.attn_out = nn.Linear(d_model, d_model)
        self.match_head = nn.Linear(d_model, 1)
        self.reset_attention()

    def reset_attention(self) -> None:
        """CLIP-style init for a one-layer transformer (spec section 2); the Linear layers keep PyTorch's."""
        d = self.attn_out.in_features
        nn.init.normal_(self.attn_in_weight, std=d**-0.5)
        nn.init.zeros_(self.attn_in_bias)
        nn.init.normal_(self.attn_out.weight, std=d**-0.5 * 2**-0.5)
        nn.init.zeros_(self.attn_out.bias)

    def forward(
        self,
        q: Tensor,
        q_norm: Tensor,
        tokens_norm: Tensor,
        cls: Tensor,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Pre-sigmoid scores [B_img, B_cap] of w . ((MHA(q_norm_i, tokens_norm_j) + c_j) * q_i) + b.

        With o_ij the concatenated per-head attention output, w . ((W_o o_ij + b_o + c_j) * q_i)
        = r_i . o_ij + (w * q_i) . (b_o + c_j) where r_i = W_o^T (w * q_i); so each head's values are scored
        against r_i once per (caption, token) and only the softmax weights are per pair.
        """
        n_img, (n_cap, seq, _) = q.shape[0], tokens_norm.shape
        heads = self.num_heads
        w_q, w_k, w_v = self.attn_in_weight.chunk(3)
        b_q, b_k, b_v = self.attn_in_bias.chunk(3)
        query = F.linear(q_norm, w_q, b_q).view(n_img, heads, -1)
        keys = F.linear(tokens_norm, w_k, b_k).view(n_cap, seq, heads, -1)
        values = F.linear(tokens_norm, w_v, b_v).view(n_cap, seq, heads, -1)

        logits = torch.einsum("ihd,jlhd->ijhl", query * query.shape[-1] ** -0.5, keys)
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[None, :, None, :], float("-inf"))
        attn = logits.softmax(dim=-1)

        weighted_q = q * self.match_head.weight[0]
        r = (weighted_q @ self.attn_out.weight).view(n_img, heads, -1)
        value_scores = torch.einsum("ihd,jlhd->ijhl", r, values)
        attended = torch.einsum("ijhl,ijhl->ij", attn, value_scores)
        return attended + weighted_q @ (cls + self.attn_out.bias).T + self.match_head.bias


class MSCMAT(nn.Module):
    """Scores [K, B_img, B_cap] in (0, 1) for every image/caption pair at each of the K image scales.

    Separate weights per scale except the two LayerNorms: ``ln_query`` (LN_A, on the projected image
    query) and ``ln_tokens`` (LN_B, on the caption tokens), shared by all scales as in the reference.
    """

    def __init__(self, in_dims: Sequence[int], d_model: int = 768, num_heads: int = 12):
        super().__init__()
        self.scales = nn.ModuleList(ScaleAlignment(c, d_model, num_heads) for c in in_dims)
        self.ln_query = LayerNormFp32(d_model)
        self.ln_tokens = LayerNormFp32(d_model)

    def forward(
        self,
        scale_feats: Sequence[Tensor],
        tokens: Tensor,
        cls: Tensor,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Score images (rows) against captions (columns).

        scale_feats: K pooled stage vectors [B_img, C_k]; tokens: caption token states [B_cap, L, D];
        cls: L2-normalised caption [CLS] [B_cap, D]; key_padding_mask: optional [B_cap, L] bool, True =
        ignore that token (improved variant; the paper attends to every position, padding included).
        """
        if len(scale_feats) != len(self.scales):
            raise ValueError(f"expected {len(self.scales)} scale features, got {len(scale_feats)}")
        tokens_norm = self.ln_tokens(tokens)
        scores = []
        for scale, feats in zip(self.scales, scale_feats):
            q = scale.query_proj(feats)
            scores.append(scale(q, self.ln_query(q), tokens_norm, cls, key_padding_mask))
        return torch.stack(scores).sigmoid()

    @classmethod
    def from_reference_state_dict(cls, state_dict: Mapping[str, Tensor], num_heads: int = 12) -> MSCMAT:
        """Build from the authors' module weights, keeping their dtype and device.

        Expected keys: fc1..fcK (query projections; in_dims and d_model come from their shapes),
        cross_attn1..K (nn.MultiheadAttention), match_fc1..K, ln_pre_t (image query, LN_A) and ln_pre_i
        (text tokens, LN_B). ``ln_post`` is defined by the reference but never applied in its forward, so it
        is accepted and dropped. Any other missing or unexpected key raises ValueError.
        """
        found = sorted(int(m[1]) for key in state_dict if (m := re.fullmatch(r"fc(\d+)\.weight", key)))
        if not found or found != list(range(1, len(found) + 1)):
            raise ValueError(f"expected query projections fc1.weight..fcK.weight, found indices {found}")

        rename = {f"ln_pre_t.{p}": f"ln_query.{p}" for p in ("weight", "bias")}
        rename |= {f"ln_pre_i.{p}": f"ln_tokens.{p}" for p in ("weight", "bias")}
        for n, k in enumerate(found):
            ours = f"scales.{n}"
            for p in ("weight", "bias"):
                rename[f"fc{k}.{p}"] = f"{ours}.query_proj.{p}"
                rename[f"cross_attn{k}.out_proj.{p}"] = f"{ours}.attn_out.{p}"
                rename[f"match_fc{k}.{p}"] = f"{ours}.match_head.{p}"
            rename[f"cross_attn{k}.in_proj_weight"] = f"{ours}.attn_in_weight"
            rename[f"cross_attn{k}.in_proj_bias"] = f"{ours}.attn_in_bias"

        dropped = {"ln_post.weight", "ln_post.bias"}
        missing = sorted(set(rename) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(rename) - dropped)
        if missing or unexpected:
            raise ValueError(f"not an MSCMAT reference state dict: missing {missing}, unexpected {unexpected}")

        first = state_dict["fc1.weight"]
        in_dims = [state_dict[f"fc{k}.weight"].shape[1] for k in found]
        model = cls(in_dims, d_model=first.shape[0], num_heads=num_heads).to(first.device, first.dtype)
        model.load_state_dict({ours: state_dict[theirs] for theirs, ours in rename.items()})
        return model
