"""Recall@K against sort-based brute force, a hand-worked case, the classic 5-caption loop, and chance."""

import numpy as np
import pytest
import torch

from msa.metrics import chance_recall, chunked_ranks, ranks, recall_at_k, recall_from_ranks


def brute_force(sims: np.ndarray, caption_image: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    n_images, n_captions = sims.shape
    i2t = []
    for i in range(n_images):
        own = np.flatnonzero(caption_image == i)
        if len(own):
            order = np.argsort(-sims[i])
            i2t.append(min(np.flatnonzero(order == c)[0] for c in own))
    t2i = [np.flatnonzero(np.argsort(-sims[:, j]) == caption_image[j])[0] for j in range(n_captions)]
    out = {f"i2t_R{k}": 100 * np.mean(np.array(i2t) < k) for k in ks}
    out |= {f"t2i_R{k}": 100 * np.mean(np.array(t2i) < k) for k in ks}
    out["mR"] = np.mean(list(out.values()))
    return out


def classic_protocol(sims: np.ndarray) -> dict[str, float]:
    """The Karpathy/VSE++ evaluation loop: exactly 5 captions per image, stored image-major."""
    npts = sims.shape[0]
    ranks = np.zeros(npts)
    for index in range(npts):
        inds = np.argsort(sims[index])[::-1]
        rank = 1e20
        for i in range(5 * index, 5 * index + 5):
            tmp = np.where(inds == i)[0][0]
            if tmp < rank:
                rank = tmp
        ranks[index] = rank
    r = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    sims_t = sims.T
    ranks = np.zeros(5 * npts)
    for index in range(npts):
        for i in range(5):
            inds = np.argsort(sims_t[5 * index + i])[::-1]
            ranks[5 * index + i] = np.where(inds == index)[0][0]
    ri = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)]
    names = ["i2t_R1", "i2t_R5", "i2t_R10", "t2i_R1", "t2i_R5", "t2i_R10"]
    return dict(zip(names, r + ri)) | {"mR": sum(r + ri) / 6}


def assert_same(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k] == pytest.approx(expected[k], abs=1e-9), k


def noisy_sims(caption_image: np.ndarray, n_images: int, seed: int) -> np.ndarray:
    """Random scores with a signal on the true pairs, so recalls sit between 0 and 100."""
    rng = np.random.default_rng(seed)
    sims = rng.normal(size=(n_images, len(caption_image)))
    sims[caption_image, np.arange(len(caption_image))] += 1.5
    return sims


def test_five_captions_per_image_matches_brute_force_and_classic_protocol():
    caption_image = np.repeat(np.arange(40), 5)
    sims = noisy_sims(caption_image, 40, seed=0)
    got = recall_at_k(torch.from_numpy(sims), torch.from_numpy(caption_image))
    assert_same(got, brute_force(sims, caption_image))
    assert_same(got, classic_protocol(sims))
    assert 0 < got["i2t_R1"] < 100 and 0 < got["t2i_R1"] < 100


def test_variable_caption_counts_in_any_order_match_brute_force():
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 8, size=30)
    counts[7] = 0  # an image nobody describes: a text->image candidate, absent from image->text
    caption_image = rng.permutation(np.repeat(np.arange(30), counts))
    sims = noisy_sims(caption_image, 30, seed=2)
    ks = (1, 3, 10)
    assert_same(recall_at_k(sims, caption_image, ks=ks), brute_force(sims, caption_image, ks=ks))


def test_hand_computed_case():
    caption_image = [0, 0, 1, 1, 2, 2]
    sims = torch.tensor(
        [
            [0.9, 0.1, 0.95, 0.2, 0.3, 0.4],  # best own 0.9, beaten by 0.95 -> rank 1
            [0.5, 0.6, 0.7, 0.1, 0.2, 0.3],  # best own 0.7, unbeaten -> rank 0
            [0.8, 0.7, 0.9, 0.2, 0.3, 0.6],  # best own 0.6, beaten by 0.8, 0.7, 0.9 -> rank 3
        ]
    )
    # text->image ranks per caption column: 0, 2, 2, 2, 0 (tie 0.3 = 0.3 counts in its favour), 0
    got = recall_at_k(sims, caption_image, ks=(1, 2, 4))
    expected = {"i2t_R1": 100 / 3, "i2t_R2": 200 / 3, "i2t_R4": 100.0, "t2i_R1": 50.0, "t2i_R2": 50.0, "t2i_R4": 100.0}
    assert_same(got, expected | {"mR": 400 / 6})


def test_rejects_misaligned_caption_index():
    with pytest.raises(ValueError):
        recall_at_k(torch.zeros(3, 6), [0, 1, 2])


def test_chance_recall_matches_monte_carlo():
    rng = np.random.default_rng(0)
    caption_image = np.repeat(np.arange(20), rng.integers(1, 6, size=20))
    trials = [recall_at_k(rng.random((20, len(caption_image))), caption_image) for _ in range(400)]
    chance = chance_recall(caption_image)
    for k, v in chance.items():
        assert np.mean([t[k] for t in trials]) == pytest.approx(v, abs=2.5), k
    assert chance["t2i_R5"] == pytest.approx(25.0)


def test_chance_recall_exact_values():
    chance = chance_recall(np.repeat(np.arange(4), 2), ks=(1, 8), n_images=5)
    # 8 captions, 2 per described image: P(top-1 is own) = 2/8; K >= 8 always hits. 5 image candidates.
    assert chance == pytest.approx({"i2t_R1": 25.0, "i2t_R8": 100.0, "t2i_R1": 20.0, "t2i_R8": 100.0, "mR": 61.25})


@pytest.mark.parametrize("chunk", [1, 7, 512, 10_000])
def test_chunked_ranks_equal_the_full_matrix(chunk):
    """Random float64 embeddings and small-integer ones (exact products, many ties): identical ranks."""
    g = torch.Generator().manual_seed(0)
    caption_image = torch.randint(0, 300, (1500,), generator=g)
    caption_image[:300] = torch.arange(300)  # every image has a caption ...
    caption_image[caption_image == 299] = 298  # ... except one, left out of image->text
    for image_emb, text_emb in (
        (torch.randn(300, 16, generator=g, dtype=torch.float64), torch.randn(1500, 16, generator=g, dtype=torch.float64)),
        (torch.randint(-2, 3, (300, 4), generator=g).float(), torch.randint(-2, 3, (1500, 4), generator=g).float()),
    ):
        full = ranks(image_emb @ text_emb.T, caption_image)
        chunked = chunked_ranks(image_emb, text_emb, caption_image, chunk=chunk)
        assert torch.equal(full[0], chunked[0]) and torch.equal(full[1], chunked[1])
        assert recall_from_ranks(*chunked) == recall_at_k(image_emb @ text_emb.T, caption_image)
        assert len(chunked[0]) == 299
