"""MSA losses against explicit-loop references, the paper's loss floor, and the weighting of the total."""

import math

import pytest
import torch
import torch.nn.functional as F

from msa.config import resolve_config
from msa.losses import alignment_loss, compute_loss, consistency_loss, hardest_triplet_loss, infonce_loss, msa_loss


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit(b, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)


def ref_alignment(S, temperature=1.0, both=False, same=None):
    b = S.shape[0]

    def ce(M):
        total = 0.0
        for i in range(b):
            denom = sum(math.exp(M[i][j] / temperature) for j in range(b) if j == i or same is None or not same[i][j])
            total += -M[i][i] / temperature + math.log(denom)
        return total / b

    rows = ce(S.tolist())
    return (rows + ce(S.T.tolist())) / 2 if both else rows


def ref_consistency(T, S, temperature=2.0, same=None):
    b = len(S)
    keep = [[i == j or same is None or not same[i][j] for j in range(b)] for i in range(b)]
    total = 0.0
    for j in range(b):  # one distribution over images per caption column
        zt = sum(math.exp(T[i][j] / temperature) for i in range(b) if keep[i][j])
        zs = sum(math.exp(S[i][j] / temperature) for i in range(b) if keep[i][j])
        for i in range(b):
            if keep[i][j]:
                p = math.exp(T[i][j] / temperature) / zt
                q = math.exp(S[i][j] / temperature) / zs
                total += q * (math.log(q) - math.log(p))
    return total / b**2


def ref_triplet(img, txt, margin=0.5, ids=None, negatives="hardest"):
    sims = (img @ txt.T).tolist()
    b = len(sims)
    ids = list(range(b)) if ids is None else ids.tolist()
    total = 0.0
    for i in range(b):
        negs = [j for j in range(b) if ids[j] != ids[i]]
        if negs and negatives == "hardest":
            total += max(0.0, margin + max(sims[i][j] for j in negs) - sims[i][i])  # image i vs captions
            total += max(0.0, margin + max(sims[j][i] for j in negs) - sims[i][i])  # caption i vs images
        for j in negs if negatives == "all" else []:
            total += max(0.0, margin + sims[i][j] - sims[i][i]) + max(0.0, margin + sims[j][i] - sims[i][i])
    return total


IDS = torch.tensor([0, 1, 0, 2, 1, 3])


@pytest.mark.parametrize("temperature", [None, 0.1])
@pytest.mark.parametrize("both", [False, True])
@pytest.mark.parametrize("ids", [None, IDS])
def test_alignment_matches_loop(temperature, both, ids):
    S = rand(6, 6)
    same = None if ids is None else ids[:, None] == ids[None, :]
    got = alignment_loss(S, temperature=temperature, both_directions=both, positive_mask=same)
    expected = ref_alignment(S, temperature or 1.0, both, None if same is None else same.tolist())
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_alignment_floor_of_the_paper_preset():
    b, scales, w = 32, 4, 15.0
    floor = w * scales * math.log(1 + (b - 1) / math.e)
    assert floor == pytest.approx(151.08, abs=0.01)
    best = w * scales * alignment_loss(torch.eye(b, dtype=torch.float64))
    uniform = w * scales * alignment_loss(torch.full((b, b), 0.5, dtype=torch.float64))
    assert best.item() == pytest.approx(floor, rel=1e-12)
    assert uniform.item() == pytest.approx(w * scales * math.log(b), rel=1e-12)
    assert uniform.item() == pytest.approx(207.94, abs=0.01)
    for seed in range(20):
        S = rand(b, b, seed=seed).pow(0.1 + seed)  # from near 1 everywhere to near 0 off a few entries
        assert w * scales * alignment_loss(S).item() >= floor


@pytest.mark.parametrize("ids", [None, IDS])
def test_consistency_matches_loop(ids):
    T, S = rand(6, 6, seed=1), rand(6, 6, seed=2)
    same = None if ids is None else ids[:, None] == ids[None, :]
    got = consistency_loss(T, S, 2.0, positive_mask=same)
    expected = ref_consistency(T.tolist(), S.tolist(), 2.0, None if same is None else same.tolist())
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_consistency_zero_at_agreement_and_teacher_gets_no_gradient():
    teacher = rand(5, 5).requires_grad_(True)
    assert consistency_loss(teacher, teacher.detach().clone()).item() == pytest.approx(0.0, abs=1e-15)
    student = rand(5, 5, seed=3).requires_grad_(True)
    consistency_loss(teacher, student, positive_mask=IDS[:5, None] == IDS[None, :5]).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_triplet_sums_over_batch_and_both_directions():
    img, txt = unit(6, 8, seed=1), unit(6, 8, seed=2)
    got = hardest_triplet_loss(img, txt, 0.5)
    assert got.item() == pytest.approx(ref_triplet(img, txt), rel=1e-12)
    assert hardest_triplet_loss(img, txt, 0.5, reduction="mean").item() == pytest.approx(got.item() / 6, rel=1e-12)
    with pytest.raises(ValueError):
        hardest_triplet_loss(img, txt, reduction="max")


def test_triplet_image_ids_remove_same_image_negatives():
    img, txt = unit(6, 8, seed=1), unit(6, 8, seed=2)
    txt[2] = img[0]  # caption 2 describes image 0: the hardest "negative" of image 0 unless masked
    plain = hardest_triplet_loss(img, txt, 0.5)
    masked = hardest_triplet_loss(img, txt, 0.5, image_ids=IDS)
    assert masked.item() == pytest.approx(ref_triplet(img, txt, ids=IDS), rel=1e-12)
    assert masked.item() < plain.item()


@pytest.mark.parametrize("ids", [None, IDS])
def test_triplet_all_negatives_sums_every_hinge(ids):
    img, txt = unit(6, 8, seed=3), unit(6, 8, seed=4)
    got = hardest_triplet_loss(img, txt, 0.5, image_ids=ids, negatives="all")
    assert got.item() == pytest.approx(ref_triplet(img, txt, ids=ids, negatives="all"), rel=1e-12)
    assert got.item() > hardest_triplet_loss(img, txt, 0.5, image_ids=ids).item()
    with pytest.raises(ValueError):
        hardest_triplet_loss(img, txt, negatives="semi")


def test_triplet_single_item_batch_is_zero_and_finite_gradient():
    img, txt = unit(1, 4).requires_grad_(True), unit(1, 4, seed=1)
    loss = hardest_triplet_loss(img, txt)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(img.grad).all()


def test_losses_stay_on_the_input_device():
    # On the meta device any host copy (.cpu(), .item(), .tolist()) would raise.
    S = torch.empty(4, 8, 8, device="meta")
    img, txt = torch.empty(8, 16, device="meta"), torch.empty(8, 16, device="meta")
    out = msa_loss(S, img, txt, image_ids=torch.zeros(8, dtype=torch.long, device="meta"))
    assert all(v.device.type == "meta" and v.shape == () for v in out.values())


@pytest.mark.parametrize("ids", [None, IDS])
def test_msa_loss_is_the_weighted_sum_of_its_parts(ids):
    S = rand(4, 6, 6, seed=5)
    img, txt = unit(6, 8, seed=1), unit(6, 8, seed=2)
    same = None if ids is None else ids[:, None] == ids[None, :]
    out = msa_loss(S, img, txt, w_align=15.0, w_cons=10.0, image_ids=ids, align_temperature=0.5)
    align = sum(alignment_loss(S[k], temperature=0.5, positive_mask=same) for k in range(4))
    cons = sum(consistency_loss(S[3], S[k], 2.0, positive_mask=same) for k in range(3))
    triplet = hardest_triplet_loss(img, txt, 0.5, image_ids=ids)
    torch.testing.assert_close(out["align"], align, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["cons"], cons, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["triplet"], triplet, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["total"], triplet + 15.0 * align + 10.0 * cons, rtol=1e-12, atol=0)
    assert out["cons"].item() > 0 and out["align"].item() > 0


def test_msa_loss_near_240_at_initialisation_like_scores():
    # Near-constant MSCMAT scores and random embeddings: 15 * 4 * log(32) ~ 208 plus a ~32-64 triplet sum.
    b = 32
    S = 0.5 + 0.01 * rand(4, b, b)
    out = msa_loss(S, unit(b, 768, seed=1), unit(b, 768, seed=2))
    assert 230 < out["total"].item() < 280


def test_infonce_matches_a_hand_written_loop_and_joins_the_objective_only_when_weighted():
    img, txt, t = unit(6, 8, seed=3), unit(6, 8, seed=4), 0.07
    sims = (img @ txt.T).tolist()

    def ce(row: list[float], target: int) -> float:
        return -(row[target] / t - math.log(sum(math.exp(v / t) for v in row)))

    i2t = sum(ce(sims[i], i) for i in range(6)) / 6
    t2i = sum(ce([sims[j][i] for j in range(6)], i) for i in range(6)) / 6
    assert infonce_loss(img, txt, t).item() == pytest.approx((i2t + t2i) / 2, rel=1e-9)

    S = rand(4, 6, 6, seed=5)
    plain = msa_loss(S, img, txt)
    assert "infonce" not in plain  # the paper objective is unchanged unless asked for
    weighted = msa_loss(S, img, txt, w_infonce=0.5, infonce_temperature=t)
    torch.testing.assert_close(weighted["infonce"], infonce_loss(img, txt, t))
    torch.testing.assert_close(weighted["total"], plain["total"] + 0.5 * weighted["infonce"])

    cfg = resolve_config("small", ["loss.w_infonce=0.5"]).loss
    out = type("Out", (), {"scores": S, "image_emb": img, "text_emb": txt})()
    assert set(compute_loss(out, cfg)) == {"total", "triplet", "align", "cons", "infonce"}
