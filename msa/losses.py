"""MSA training losses (spec section 3), with the reference's directions and reductions as defaults.

L = L_tri + w_align * sum_k L_align,k + w_cons * sum_{k<K} L_cons,k. Each improved variant is a named
option that defaults to the paper behaviour. ``compute_loss`` composes the objective from the config:
adding a term means a function here, an entry in ``compute_loss`` and its weight in ``LossConfig``;
the engine logs and prints every entry of the returned dict by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from msa.config import LossConfig
    from msa.model import MSAOutput


def _off_diagonal(mask: Tensor) -> Tensor:
    """Drop the diagonal so an image-id equality matrix never masks the true pairs."""
    return mask & ~torch.eye(mask.shape[0], mask.shape[1], dtype=torch.bool, device=mask.device)


def same_image_mask(image_ids: Tensor) -> Tensor:
    """[B, B] bool, True where batch items i and j show the same image (diagonal included)."""
    return image_ids[:, None] == image_ids[None, :]


def alignment_loss(
    S: Tensor,
    *,
    temperature: float | None = None,
    both_directions: bool = False,
    positive_mask: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of each image row of S [B, B] over the captions, target = the diagonal, batch mean.

    The paper feeds the (0, 1) sigmoid scores straight in as logits, which caps how peaked the softmax can
    get (with B = 32 the loss never drops below log(1 + 31/e) ~ 2.52); ``temperature`` divides the logits
    to lift that cap. ``both_directions`` averages in the caption->image cross-entropy. ``positive_mask``
    marks other captions of the same image (its diagonal is ignored); they leave the softmax instead of
    being pushed down as negatives.
    """
    logits = S if temperature is None else S / temperature
    if positive_mask is not None:
        logits = logits.masked_fill(_off_diagonal(positive_mask), float("-inf"))
    target = torch.arange(S.shape[0], device=S.device)
    loss = F.cross_entropy(logits, target)
    if both_directions:
        loss = (loss + F.cross_entropy(logits.T, target)) / 2
    return loss


def consistency_loss(
    S_teacher: Tensor,
    S_student: Tensor,
    temperature: float = 2.0,
    *,
    positive_mask: Tensor | None = None,
) -> Tensor:
    """KL(Q || P) / B^2 between per-caption distributions over images of a student and the teacher scale.

    P = softmax(S_teacher / T) and Q = softmax(S_student / T) over images (dim 0, one distribution per
    caption column). Direction and reduction are the reference's: sum Q (log Q - log P) divided by the
    number of elements, not by B. The teacher is detached, so only the student scale learns from it.
    ``positive_mask`` removes other same-image entries from both distributions and from the sum.
    """
    teacher = S_teacher.detach() / temperature
    student = S_student / temperature
    drop = None if positive_mask is None else _off_diagonal(positive_mask)
    if drop is not None:
        teacher = teacher.masked_fill(drop, float("-inf"))
        student = student.masked_fill(drop, float("-inf"))
    log_p = teacher.log_softmax(dim=0)
    log_q = student.log_softmax(dim=0)
    log_ratio = log_q - log_p
    if drop is not None:
        log_ratio = log_ratio.masked_fill(drop, 0.0)  # -inf - -inf; Q is 0 there anyway
    return (log_q.exp() * log_ratio).sum() / S_student.numel()


def hardest_triplet_loss(
    img: Tensor,
    txt: Tensor,
    margin: float = 0.5,
    *,
    image_ids: Tensor | None = None,
    reduction: Literal["sum", "mean"] = "sum",
    negatives: Literal["hardest", "all"] = "hardest",
) -> Tensor:
    """VSE++ max-violation hinge on L2-normalised embeddings img, txt [B, D], item i matching item i.

    For each image its most similar non-matching caption, for each caption its most similar non-matching
    image: (margin + neg - pos).clamp(min=0), summed over both directions and the batch (the paper's
    reduction; "mean" divides that sum by B). Mining stays on the input device. ``image_ids`` stops other
    captions of the same image from counting as negatives. ``negatives="all"`` sums the hinge over every
    negative instead (VSE0): a from-scratch model trained on hardest negatives alone tends to collapse
    to one embedding (loss stuck at 2 * B * margin), while the sum gives every negative a gradient.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if negatives not in ("hardest", "all"):
        raise ValueError(f"negatives must be 'hardest' or 'all', got {negatives!r}")
    sims = img @ txt.T
    pos = sims.diagonal()
    not_negative = torch.eye(sims.shape[0], dtype=torch.bool, device=sims.device)
    if image_ids is not None:
        not_negative = not_negative | same_image_mask(image_ids)
    if negatives == "all":
        cost_i2t = (margin + sims - pos[:, None]).clamp(min=0).masked_fill(not_negative, 0.0)
        cost_t2i = (margin + sims - pos[None, :]).clamp(min=0).masked_fill(not_negative, 0.0)
        loss = cost_i2t.sum() + cost_t2i.sum()
        return loss / sims.shape[0] if reduction == "mean" else loss
    masked = sims.masked_fill(not_negative, float("-inf"))
    cost_i2t = (margin + masked.amax(dim=1) - pos).clamp(min=0)
    cost_t2i = (margin + masked.amax(dim=0) - pos).clamp(min=0)
    loss = cost_i2t.sum() + cost_t2i.sum()
    return loss / sims.shape[0] if reduction == "mean" else loss


def infonce_loss(
    img: Tensor, txt: Tensor, temperature: float | Tensor = 0.07, *, image_ids: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE (CLIP's contrastive loss) on L2-normalised img, txt [B, D], item i matching item i.

    Mean of the image->text and text->image cross-entropies of cosine / temperature over the batch.
    ``temperature`` may be a 0-d tensor (1 / a learnable logit scale), which then receives a gradient.
    ``image_ids`` removes other captions of the same image from the negatives.
    """
    logits = img @ txt.T / temperature
    if image_ids is not None:
        logits = logits.masked_fill(_off_diagonal(same_image_mask(image_ids)), float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def msa_loss(
    S: Tensor,
    img: Tensor,
    txt: Tensor,
    *,
    w_align: float = 15.0,
    w_cons: float = 10.0,
    margin: float = 0.5,
    cons_temperature: float = 2.0,
    align_temperature: float | None = None,
    align_both_directions: bool = False,
    image_ids: Tensor | None = None,
    triplet_reduction: Literal["sum", "mean"] = "sum",
    triplet_negatives: Literal["hardest", "all"] = "hardest",
    w_infonce: float = 0.0,
    infonce_temperature: float | Tensor = 0.07,
) -> dict[str, Tensor]:
    """The full objective from MSCMAT scores S [K, B, B] and global embeddings img, txt [B, D].

    Returns total, triplet, align (unweighted sum over the K scales) and cons (unweighted sum over scales
    1..K-1 against the last scale as teacher); total = triplet + w_align * align + w_cons * cons, plus
    w_infonce * infonce (and an ``infonce`` entry) when that weight is set.
    ``image_ids`` [B] (integers) turns on same-image masking in every term.
    """
    positives = None if image_ids is None else same_image_mask(image_ids)
    triplet = hardest_triplet_loss(
        img, txt, margin, image_ids=image_ids, reduction=triplet_reduction, negatives=triplet_negatives
    )
    align = torch.stack(
        [
            alignment_loss(
                s, temperature=align_temperature, both_directions=align_both_directions, positive_mask=positives
            )
            for s in S
        ]
    ).sum()
    cons = S.new_zeros(())
    for s in S[:-1]:
        cons = cons + consistency_loss(S[-1], s, cons_temperature, positive_mask=positives)
    terms = {"triplet": triplet, "align": align, "cons": cons}
    total = triplet + w_align * align + w_cons * cons
    if w_infonce > 0:
        terms["infonce"] = infonce_loss(img, txt, infonce_temperature, image_ids=image_ids)
        total = total + w_infonce * terms["infonce"]
    return {"total": total, **terms}


def compute_loss(out: MSAOutput, cfg: LossConfig, image_ids: Tensor | None = None) -> dict[str, Tensor]:
    """The objective ``cfg`` describes, from a forward pass: ``total`` plus one unweighted entry per term.

    Scores and embeddings are cast to float32 first (autocast may have produced bf16). ``image_ids``
    is used only when ``cfg.mask_same_image`` is on. When the model has a learnable logit scale
    (``out.logit_scale``, ``loss.learn_temperature``), InfoNCE uses 1 / that scale as its temperature.
    """
    scale = getattr(out, "logit_scale", None)
    temperature = cfg.infonce_temperature if scale is None else 1 / scale.float()
    return msa_loss(
        out.scores.float(),
        out.image_emb.float(),
        out.text_emb.float(),
        w_align=cfg.w_align,
        w_cons=cfg.w_cons,
        margin=cfg.margin,
        cons_temperature=cfg.cons_temperature,
        align_temperature=cfg.align_temperature,
        align_both_directions=cfg.align_both_directions,
        image_ids=image_ids if cfg.mask_same_image else None,
        triplet_reduction=cfg.triplet_reduction,
        triplet_negatives=cfg.triplet_negatives,
        w_infonce=cfg.w_infonce,
        infonce_temperature=temperature,
    )
