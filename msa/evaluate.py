"""Recall evaluation: embed every image and every caption once, rank on the device (spec section 5)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from msa.data import ImageTransform, SplitImages, pair_loader
from msa.encoders import tokenize
from msa.metrics import chunked_ranks, recall_from_ranks
from msa.model import MSAModel


@dataclass
class EmbeddedSplit:
    image_emb: torch.Tensor  # [N_images, D]
    text_emb: torch.Tensor  # [N_captions, D]
    caption_image: torch.Tensor  # [N_captions] image index of each caption
    keys: list[str]
    captions: list[str]

    def similarities(self) -> torch.Tensor:
        return self.image_emb @ self.text_emb.T


@torch.no_grad()
def embed_split(
    model: MSAModel,
    urls: list[str],
    *,
    transform: ImageTransform,
    tokenizer,
    max_tokens: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    key_filter: Callable[[str], bool] | None = None,
    autocast_dtype: torch.dtype | None = None,
    num_workers: int = 0,
) -> EmbeddedSplit:
    """Every image and caption of the shards, embedded once, in shard order.

    Images are decoded in ``num_workers`` DataLoader workers (``train.loader_workers``; 0: in this process)
    and reach the device as uint8 batches, normalised by the model; the batches are the same whatever the
    worker count (``SplitImages``), so the recalls are too.
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    image_embs, text_embs, caption_image, keys, captions = [], [], [], [], []
    images = pair_loader(SplitImages(urls, transform, batch_size, key_filter), num_workers,
                         pin_memory=device.type == "cuda")
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for batch in images:
            image_embs.append(model.encode_image(batch["images"].to(device, non_blocking=True))[0].float())
            for key, image_captions in zip(batch["keys"], batch["captions"]):
                caption_image.extend([len(keys)] * len(image_captions))
                keys.append(key)
                captions.extend(image_captions)
        for start in range(0, len(captions), batch_size):
            ids, mask = tokenize(tokenizer, captions[start : start + batch_size], max_tokens)
            text_embs.append(model.encode_text(ids.to(device), mask.to(device))[0].float())
    model.train(was_training)
    if not keys:
        raise ValueError(f"no samples to evaluate in {urls}")
    return EmbeddedSplit(
        torch.cat(image_embs),
        torch.cat(text_embs),
        torch.tensor(caption_image, device=device),
        keys,
        captions,
    )


def evaluate_recall(split: EmbeddedSplit, chunk: int = 4096) -> dict[str, float]:
    """Recall of an embedded split, ranked ``chunk`` captions at a time (bounded memory at any size)."""
    return recall_from_ranks(*chunked_ranks(split.image_emb, split.text_emb, split.caption_image, chunk))
