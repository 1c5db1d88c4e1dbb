"""The MSA model: two towers for retrieval plus MSCMAT, a training-time alignment signal."""

from __future__ import annotations

import math
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


class MSAModel(nn.Module):
    def __init__(self, cfg: MSAConfig):
        super().__init__()
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
        v, scale_feats = self.image(images)
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

