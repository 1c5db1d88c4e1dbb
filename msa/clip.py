"""open_clip towers as MSA encoders: CLIP's own global embeddings plus K image scales for MSCMAT.

The global image and text embeddings are exactly open_clip's ``encode_image`` / ``encode_text`` (same
modules, same ops), so a pretrained CLIP's retrieval is where fine-tuning starts. MSCMAT additionally
gets K pooled image scales (see ``ClipImageEncoder``) and the caption's token states.

Weights come from a local file only (``clip.checkpoint``); nothing here downloads. Random init happens
only with an explicit ``clip.random_init=true``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import Tensor, nn

from msa.config import MSAConfig
from msa.pretrained import WeightsUnavailableError

__all__ = [
    "ClipImageEncoder", "ClipTextEncoder", "ClipTokenizer", "build_clip_model", "build_clip_towers",
    "evenly_spaced_blocks", "load_clip_state",
]

CHECKPOINT_FORMAT = (
    "expected a torch or safetensors file holding an open_clip state dict of this architecture "
    "(keys like 'visual.proj', 'token_embedding.weight'), optionally wrapped as {'state_dict': ...} "
    "and/or with 'module.' prefixes"
)


# ----------------------------------------------------------------------------------------- image


def evenly_spaced_blocks(n_blocks: int, k: int) -> list[int]:
    """0-based indices of K of n blocks, evenly spaced and ending at the last: 12, 4 -> 2, 5, 8, 11."""
    if not 1 <= k <= n_blocks:
        raise ValueError(f"clip.scales={k}: the vision transformer has {n_blocks} blocks, so 1..{n_blocks} scales")
    return [n_blocks * (i + 1) // k - 1 for i in range(k)]


class ClipImageEncoder(nn.Module):
    """An open_clip visual tower: v = its own output (``encode_image``), plus K pooled scale vectors.

    The scales are read with forward hooks during the tower's unchanged forward, so v is bit for bit
    open_clip's.

    - ViT: the residual stream after K evenly spaced blocks (12 blocks, K=4: blocks 3, 6, 9, 12), each
      the MEAN OF ITS PATCH TOKENS. Patch tokens are the ViT's spatial map, the analogue of the CNN stage
      map the spec pools; the class token is not used because early on it has gathered little, and after
      the last block it is what v already is. Mean rather than max: ViT residual streams carry a few
      very large outlier channels and tokens that a max would latch onto.
    - ModifiedResNet (RN50...): its four stages, global max pooled for 1-3 and average pooled for 4, as
      the spec pools a CNN (K must be 4).
    """

    def __init__(self, visual: nn.Module, scales: int = 4):
        super().__init__()
        self.visual = visual
        if isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None:
                raise ValueError("open_clip vision towers with attentional pooling are not supported")
            blocks = visual.transformer.resblocks
            self._taps = [blocks[i] for i in evenly_spaced_blocks(len(blocks), scales)]
            self._batch_first = visual.transformer.batch_first
            self.stage_dims: tuple[int, ...] = (visual.transformer.width,) * scales
        elif isinstance(visual, ModifiedResNet):
            if scales != 4:
                raise ValueError(f"clip.scales={scales}: a ModifiedResNet tower has exactly 4 stages")
            self._taps = [visual.layer1, visual.layer2, visual.layer3, visual.layer4]
            self.stage_dims = tuple(layer[-1].bn3.num_features for layer in self._taps)
        else:
            raise ValueError(f"unsupported open_clip vision tower {type(visual).__name__} "
                             "(supported: VisionTransformer, ModifiedResNet)")

    def _pool(self, index: int, out: Tensor) -> Tensor:
        if isinstance(self.visual, ModifiedResNet):
            pool = F.adaptive_max_pool2d if index < 3 else F.adaptive_avg_pool2d
            return pool(out, 1).flatten(1)
        tokens = out if self._batch_first else out.transpose(0, 1)
        return tokens[:, 1:].mean(dim=1)

    def forward(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """images [B,3,H,W] -> (v [B,D] = encode_image, not normalised; [s_1..s_K], s_k [B,C_k])."""
        outputs: list[Tensor] = []
        handles = [tap.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for tap in self._taps]
        try:
            v = self.visual(images)
        finally:
            for handle in handles:
                handle.remove()
        return v, [self._pool(i, out) for i, out in enumerate(outputs)]


# ------------------------------------------------------------------------------------------ text


class ClipTextEncoder(nn.Module):
    """open_clip's text transformer: global = ``encode_text`` (EOT state after ln_final, projected),
    tokens = the states after ln_final at positions 1..L-1, mapped to the global width by a new Linear
    when the text width differs (RN50: 512 -> 1024), so MSCMAT sees D-wide tokens.

    The transformer is causal, so positions up to the EOT token never see padding and the attention
    mask is not needed here (MSCMAT's optional key padding mask uses it). Captions may be shorter than
    the model's context; at the full context the ops are exactly ``encode_text``'s.
    """

    def __init__(self, model: open_clip.CLIP):
        super().__init__()
        self.transformer = model.transformer
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.pool_type = model.text_pool_type
        self.eos_id = model.text_eos_id
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        width = self.transformer.width
        if isinstance(self.text_projection, nn.Linear):
            self.embed_dim = self.text_projection.out_features
        else:
            self.embed_dim = width if self.text_projection is None else self.text_projection.shape[1]
        self.token_proj = nn.Linear(width, self.embed_dim) if width != self.embed_dim else nn.Identity()

    @property
    def hidden_size(self) -> int:
        return self.embed_dim

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) [B,L] -> (global [B,D] not normalised, tokens [B,L-1,D])."""
        length = input_ids.shape[1]
        if length > self.positional_embedding.shape[0]:
            raise ValueError(f"captions of {length} tokens exceed the model's context of "
                             f"{self.positional_embedding.shape[0]} (text.max_tokens)")
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(input_ids).to(cast_dtype)
        x = x + self.positional_embedding[:length].to(cast_dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        pooled = text_global_pool(x, input_ids, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection
        return pooled, self.token_proj(x[:, 1:])


# ------------------------------------------------------------------------------------- tokenizer


class ClipTokenizer:
    """open_clip's BPE tokenizer for ``arch`` (ships with open_clip: offline), rebuildable from a directory.

    ``save_pretrained`` writes a small JSON naming the arch, the hook the MLflow publish step calls.
    """

    FILE = "open_clip_tokenizer.json"

    def __init__(self, arch: str | None = None):
        self.arch = arch
        self.tokenizer = open_clip.get_tokenizer(arch) if arch else SimpleTokenizer()
        if not isinstance(self.tokenizer, SimpleTokenizer):
            raise ValueError(f"open_clip arch {arch!r} uses {type(self.tokenizer).__name__}; only the "
                             "offline CLIP BPE tokenizer is supported")

    def ids_and_mask(self, captions: Sequence[str], max_tokens: int) -> tuple[Tensor, Tensor]:
        """(ids, mask) [N, max_tokens] long: <sot> pieces <eot> 0...; mask 1 up to and including <eot>.

        The mask comes from the <eot> position, not from ids != 0: id 0 is a real BPE token ('!').
        """
        ids = self.tokenizer(list(captions), context_length=max_tokens)
        eot = (ids == self.tokenizer.eot_token_id).int().argmax(dim=1, keepdim=True)
        mask = (torch.arange(max_tokens).unsqueeze(0) <= eot).long()
        return ids, mask

    def save_pretrained(self, directory: str | os.PathLike[str]) -> list[str]:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / self.FILE).write_text(json.dumps({"open_clip_arch": self.arch}))
        return [str(path / self.FILE)]

    @classmethod
    def from_directory(cls, directory: str | os.PathLike[str]) -> ClipTokenizer:
        """The tokenizer ``save_pretrained`` wrote into ``directory``."""
        return cls(json.loads((Path(directory) / cls.FILE).read_text())["open_clip_arch"])


# ------------------------------------------------------------------------------------ the model


def _read_state(path: str) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise WeightsUnavailableError(f"clip.checkpoint={path}: no such file; {CHECKPOINT_FORMAT}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state: Any = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise many types for a foreign or corrupt file
        reason = " ".join(str(e).split())[:160]
        raise WeightsUnavailableError(f"clip.checkpoint={path}: unreadable ({type(e).__name__}: {reason}); "
                                      f"{CHECKPOINT_FORMAT}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"clip.checkpoint={path}: not a state dict of tensors; {CHECKPOINT_FORMAT}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_clip_state(model: nn.Module, path: str) -> None:
    """Strictly load the open_clip state dict in ``path`` into ``model``; WeightsUnavailableError otherwise."""
    state = _read_state(path)
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatched = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or mismatched:
        def some(keys: list[str]) -> str:
            return f"{len(keys)} (e.g. {', '.join(keys[:3])})" if keys else "0"

        raise WeightsUnavailableError(
            f"clip.checkpoint={path}: does not fit the configured open_clip model: missing keys {some(missing)}, "
            f"unexpected keys {some(unexpected)}, shape mismatches {some(mismatched)}; {CHECKPOINT_FORMAT}")
    model.load_state_dict(state, strict=True)


def build_clip_model(cfg: MSAConfig) -> open_clip.CLIP:
    """The open_clip model ``cfg.clip`` describes, with its weights (or random, only when asked).

    Built as ``open_clip.create_model(arch)`` builds a CLIP (its config, ``open_clip.CLIP(**config)``),
    without create_model's misleading "initialized randomly" warning before the checkpoint loads.
    """
    clip = cfg.clip
    config = deepcopy(clip.model_cfg) or open_clip.get_model_config(clip.arch.replace("/", "-"))
    if config is None:
        raise ValueError(f"clip.arch={clip.arch}: not an open_clip model name (see open_clip.list_models())")
    if (config.pop("custom_text", False) or "hf_model_name" in config.get("text_cfg", {})
            or "timm_model_name" in config.get("vision_cfg", {})):
        raise ValueError(f"clip.arch={clip.arch}: only open_clip CLIP models with their own vision and text "
                         "transformers (or ModifiedResNet) are supported, not HF or timm towers")
    model = open_clip.CLIP(**config)
    if clip.checkpoint is not None:
        load_clip_state(model, clip.checkpoint)
    elif not clip.random_init:
        raise WeightsUnavailableError(
            f"clip.arch={clip.arch}: no weights given; pass clip.checkpoint=PATH (a local open_clip state dict, "
            "e.g. RemoteCLIP or GeoRSCLIP; nothing is downloaded), or clip.random_init=true for random towers")
    return model


def build_clip_towers(cfg: MSAConfig) -> tuple[ClipTextEncoder, ClipImageEncoder]:
    """(text, image) towers sharing one open_clip model's weights.

    The checkpoint's logit scale is kept as ``text.logit_scale_init`` (a float, log of the scale; None with
    random towers), where ``MSAModel`` starts its learnable scale from when ``loss.learn_temperature`` is on.
    """
    model = build_clip_model(cfg)
    text = ClipTextEncoder(model)
    scale = getattr(model, "logit_scale", None)
    text.logit_scale_init = float(scale.detach()) if cfg.clip.checkpoint is not None and scale is not None else None
    image = ClipImageEncoder(model.visual, cfg.clip.scales)
    return text, image
