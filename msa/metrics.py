"""Retrieval recall (spec section 5) from an explicit caption->image index, so any caption count works.

Ranks are counts of strictly better candidates, computed on the similarity matrix's own device without
sorting; ties therefore resolve in the query's favour (random float scores have none).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    import numpy as np

# The names every run, model version and table reports (MLflow metric names: no '@').
RECALL_KEYS = ("i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10", "mR")


def _summary(i2t_hits: dict[int, float], t2i_hits: dict[int, float]) -> dict[str, float]:
    out = {f"i2t_R{k}": v for k, v in i2t_hits.items()} | {f"t2i_R{k}": v for k, v in t2i_hits.items()}
    out["mR"] = sum(out.values()) / len(out)
    return out


def ranks(sims: Tensor | np.ndarray, caption_image: Tensor | np.ndarray | Sequence[int]) -> tuple[Tensor, Tensor]:
    """(i2t_rank, t2i_rank) from a full [N_images, N_captions] score matrix.

    image->text: an image's rank is that of its best-scoring own caption (images without captions are
    left out); text->image: each caption's rank of its own image among all images. A rank counts the
    strictly better candidates.
    """
    sims = torch.as_tensor(sims)
    caption_image = _check_index(caption_image, sims.shape[1], sims.device)
    own = sims[caption_image, torch.arange(sims.shape[1], device=sims.device)]
    best_own, has_caption = _best_own(own, caption_image, sims.shape[0])
    return (sims[has_caption] > best_own[has_caption, None]).sum(dim=1), (sims > own).sum(dim=0)


def chunked_ranks(
    image_emb: Tensor, text_emb: Tensor, caption_image: Tensor | Sequence[int], chunk: int = 4096
) -> tuple[Tensor, Tensor]:
    """``ranks(image_emb @ text_emb.T, caption_image)`` without the full matrix: at most
    [N_images, chunk] scores exist at once (two passes over the captions: own scores, then counts).

    Every score is taken from the same chunk product in both passes, so a caption is never compared
    with a differently rounded copy of its own score; with ``chunk >= N_captions`` it is exactly the
    unchunked computation.
    """
    n_images, n_captions = image_emb.shape[0], text_emb.shape[0]
    caption_image = _check_index(caption_image, n_captions, image_emb.device)
    spans = [(s, min(s + chunk, n_captions)) for s in range(0, n_captions, chunk)]
    own = torch.cat([
        (image_emb @ text_emb[s:e].T)[caption_image[s:e], torch.arange(e - s, device=image_emb.device)]
        for s, e in spans
    ])
    best_own, has_caption = _best_own(own, caption_image, n_images)
    i2t = torch.zeros(n_images, dtype=torch.long, device=image_emb.device)
    t2i = []
    for s, e in spans:
        sims = image_emb @ text_emb[s:e].T
        i2t += (sims > best_own[:, None]).sum(dim=1)
        t2i.append((sims > own[s:e]).sum(dim=0))
    return i2t[has_caption], torch.cat(t2i)


def recall_from_ranks(i2t_rank: Tensor, t2i_rank: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    def hits(rank: Tensor) -> dict[int, float]:
        return {k: 100.0 * (rank < k).double().mean().item() for k in ks}

    return _summary(hits(i2t_rank), hits(t2i_rank))


def recall_at_k(
    sims: Tensor | np.ndarray,
    caption_image: Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """R@K in percent for image->text and text->image retrieval, plus mR (the mean of all of them).

    sims: [N_images, N_captions] scores; caption_image: [N_captions] index of each caption's image.
    Ranks as in ``ranks``; for splits too large for one matrix use ``chunked_ranks``.
    """
    return recall_from_ranks(*ranks(sims, caption_image), ks)


def _check_index(caption_image, n_captions: int, device) -> Tensor:
    index = torch.as_tensor(caption_image, device=device).long()
    if index.shape != (n_captions,):
        raise ValueError(f"caption_image has shape {tuple(index.shape)}, expected ({n_captions},)")
    return index


def _best_own(own: Tensor, caption_image: Tensor, n_images: int) -> tuple[Tensor, Tensor]:
    best = own.new_full((n_images,), float("-inf")).scatter_reduce(0, caption_image, own, reduce="amax")
    return best, torch.bincount(caption_image, minlength=n_images) > 0


def chance_recall(
    caption_image: Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    *,
    n_images: int | None = None,
) -> dict[str, float]:
    """Exact expected ``recall_at_k`` of a uniformly random ranking, the floor a trained model must beat.

    image->text: an image with n of the M captions finds one in the top K with probability
    1 - C(M - n, K) / C(M, K) (images without captions excluded, as in ``recall_at_k``);
    text->image: K / N_images. ``n_images`` defaults to max(caption_image) + 1.
    """
    index = torch.as_tensor(caption_image).long().cpu()
    counts = torch.bincount(index, minlength=n_images or 0).tolist()
    if n_images is not None and len(counts) != n_images:
        raise ValueError(f"caption_image refers to image {len(counts) - 1} but n_images={n_images}")
    m = len(index)
    per_image = [n for n in counts if n > 0]

    def i2t(k: int) -> float:
        k = min(k, m)
        return 100.0 * sum(1 - comb(m - n, k) / comb(m, k) for n in per_image) / len(per_image)

    return _summary({k: i2t(k) for k in ks}, {k: 100.0 * min(k, len(counts)) / len(counts) for k in ks})


def named_recalls(kind: str, per_corpus: dict[str, dict[str, float]]) -> dict[str, float]:
    """``<kind>_<key>`` metrics (``<key>`` when ``kind`` is empty) from figures per corpus name.

    One unnamed corpus gives its figures as they are. Named corpora (joint training) each give
    ``<kind>_<name>_<key>``, and ``<kind>_<key>`` is their unweighted mean: every corpus counts the same,
    whatever its size; published tables report corpora apart, the mean only ranks checkpoints and candidates.
    """
    def name(*parts: str) -> str:
        return "_".join(part for part in (kind, *parts) if part)

    if list(per_corpus) == [""]:
        return {name(k): v for k, v in per_corpus[""].items()}
    out = {name(corpus, k): v for corpus, figures in per_corpus.items() for k, v in figures.items()}
    shared = set.intersection(*(set(figures) for figures in per_corpus.values()))
    for key in sorted(shared):
        out[name(key)] = sum(figures[key] for figures in per_corpus.values()) / len(per_corpus)
    return out
