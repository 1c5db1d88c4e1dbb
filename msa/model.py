"""The MSA model: two towers for retrieval plus MSCMAT, a training-time alignment signal."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from msa.config import MSAConfig
from msa.encoders import build_towers
from msa.mscmat import MSCMAT


@dataclass
class MSAOutput:
    image_emb: torch.Tensor  # [B, D] L2-normalised global image embeddings (v)
    text_emb: torch.Tensor  # [B, D] L2-normalised caption [CLS]
    scores: torch.Tensor  # [K, B, B] MSCMAT scores, rows images, columns captions
    logit_scale: torch.Tensor | None = None  # learnable InfoNCE scale exp(s) clamped at 100 (loss.learn_temperature)


class ImageNormalize(nn.Module):
    """uint8 pixels -> ``(x / 255 - mean) / std`` in float, on the model's device: the one place images are
    normalised, for training, evaluation, retrieval and serving alike.

    Float input is returned unchanged: it means "already normalised" (the random tensors of tests and
    benchmarks). The statistics come from the resolved config, so the buffers are not saved in state dicts
    (checkpoints from before this module load as they are). The memory format of the input is kept
    (channels_last batches stay channels_last); under autocast the arithmetic stays float32.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_config(cls, cfg: MSAConfig) -> ImageNormalize:
        image = cfg.image
        if image.mean is None or image.std is None:
            raise ValueError("image.mean/std are unset: build the config with msa.config.resolve_config")
        return cls(image.mean, image.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            return images
        return images.float().div_(255.0).sub_(self.mean).div_(self.std)


class MSAModel(nn.Module):
    def __init__(self, cfg: MSAConfig):
        super().__init__()
        self.normalize = ImageNormalize.from_config(cfg)
        self.text, self.image = build_towers(cfg)  # BERT + timm CNN, or open_clip's towers (msa/clip.py)
        dim = self.text.hidden_size
        self.mscmat = MSCMAT(self.image.stage_dims, d_model=dim, num_heads=cfg.mscmat.num_heads)
        self.use_padding_mask = cfg.mscmat.key_padding_mask
        self.logit_scale: nn.Parameter | None = None
        if cfg.loss.learn_temperature:  # CLIP's: log of the scale, from a CLIP checkpoint when it had one
            init = getattr(self.text, "logit_scale_init", None)
            start = math.log(1 / cfg.loss.infonce_temperature) if init is None else init
            self.logit_scale = nn.Parameter(torch.tensor(float(start)))

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """uint8 [B,3,H,W] pixels (normalised here), or float ones already normalised."""
        v, scale_feats = self.image(self.normalize(images))
        return F.normalize(v, dim=-1), scale_feats

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cls, tokens = self.text(input_ids, attention_mask)
        return F.normalize(cls, dim=-1), tokens

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> MSAOutput:
        image_emb, scale_feats = self.encode_image(images)
        text_emb, tokens = self.encode_text(input_ids, attention_mask)
        padding = (attention_mask[:, 1 : 1 + tokens.shape[1]] == 0) if self.use_padding_mask else None
        scores = self.mscmat(scale_feats, tokens, text_emb, key_padding_mask=padding)
        scale = None if self.logit_scale is None else self.logit_scale.exp().clamp(max=100)
        return MSAOutput(image_emb, text_emb, scores, scale)

