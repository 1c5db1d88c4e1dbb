"""The input pipeline: equal batch counts per rank on uneven shards, pair coverage, carving, transforms."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from msa.config import resolve_config
from msa.data import ImageTransform, PairBatches, is_carved_validation, iterate_samples, pair_loader, steps_per_epoch
from msa.encoders import build_tokenizer
from msa.evaluate import embed_split, evaluate_recall
from msa.model import MSAModel
from shards.manifest import read_manifest
from shards.synth import generate_corpus
from shards.writer import write_shards


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> str:
    """27 train images in shards of at most 4, of uneven sizes: ranks see different sample counts."""
    root = tmp_path_factory.mktemp("data")
    annotations = generate_corpus(root / "corpus", splits={"train": 27, "test": 6}, image_size=32, seed=3)
    write_shards(annotations, root / "corpus" / "images", str(root / "shards"), corpus="synth", shard_size=4,
                 progress=False)
    return str(root / "shards")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("packaged:all-minilm-l6-v2")


def _batches(urls, tokenizer, rank, world, steps, workers=0, epoch=0, batch_size=8, key_filter=None):
    dataset = PairBatches(
        urls,
        transform=ImageTransform(32),
        tokenizer=tokenizer,
        max_tokens=31,
        batch_size=batch_size,
        steps_per_epoch=steps,
        rank=rank,
        world_size=world,
        seed=1,
        key_filter=key_filter,
    )
    dataset.set_epoch(epoch)
    return list(pair_loader(dataset, workers))


def test_every_rank_yields_the_same_number_of_full_batches(uneven_shards, tokenizer):
    manifest = read_manifest(uneven_shards)
    urls = manifest.shard_urls("train")
    assert len(urls) >= 7 and len({s.samples for s in manifest.splits["train"].shards}) >= 2
    steps = steps_per_epoch(manifest.splits["train"].captions, 8, world_size=3)
    counts = []
    for rank in range(3):
        batches = _batches(urls, tokenizer, rank, 3, steps)
        counts.append(len(batches))
        for batch in batches:
            assert batch["images"].shape == (8, 3, 32, 32) and batch["images"].dtype == torch.uint8
            assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, 31)
            assert batch["image_ids"].shape == (8,)
    assert counts == [steps] * 3


def test_two_loader_workers_split_the_steps_and_keep_the_total(uneven_shards, tokenizer):
    urls = read_manifest(uneven_shards).shard_urls("train")
    assert len(_batches(urls, tokenizer, 0, 1, steps=5, workers=2)) == 5


def test_one_rank_epoch_covers_every_pair_once(uneven_shards, tokenizer):
    """With a single rank and steps = pairs / batch, every (image, caption) pair appears exactly once."""
    manifest = read_manifest(uneven_shards)
    urls = manifest.shard_urls("train")
    pairs = manifest.splits["train"].captions  # 27 images * 5 captions = 135
    batches = _batches(urls, tokenizer, 0, 1, steps=pairs // 5, batch_size=5)
    ids = Counter(int(i) for b in batches for i in b["image_ids"])
    assert len(ids) == 27 and set(ids.values()) == {5}


def test_ranks_read_disjoint_shards_and_epochs_reshuffle(uneven_shards, tokenizer):
    urls = read_manifest(uneven_shards).shard_urls("train")
    seen = [set(int(i) for b in _batches(urls, tokenizer, r, 2, steps=2) for i in b["image_ids"]) for r in (0, 1)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    first = _batches(urls, tokenizer, 0, 1, steps=3, epoch=0)
    second = _batches(urls, tokenizer, 0, 1, steps=3, epoch=1)
    assert not torch.equal(first[0]["image_ids"], second[0]["image_ids"])
    again = _batches(urls, tokenizer, 0, 1, steps=3, epoch=0)
    assert torch.equal(first[0]["image_ids"], again[0]["image_ids"])


def test_carved_validation_is_deterministic_and_disjoint(uneven_shards):
    urls = read_manifest(uneven_shards).shard_urls("train")
    keys = [s.key for s in iterate_samples(urls)]
    val = [k for k in keys if is_carved_validation(k, 0.3)]
    assert 0 < len(val) < len(keys)
    assert val == [k for k in keys if is_carved_validation(k, 0.3)]
    train_keys = [s.key for s in iterate_samples(urls, lambda k: not is_carved_validation(k, 0.3))]
    assert set(train_keys) | set(val) == set(keys) and not set(train_keys) & set(val)


def test_image_transform_resizes_shorter_side_and_crops_to_uint8_chw():
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, 20:60] = (255, 128, 7)  # coloured centre band, black sides
    out = ImageTransform(20)(Image.fromarray(pixels))
    assert out.shape == (3, 20, 20) and out.dtype == torch.uint8 and out.is_contiguous()
    assert out[:, 10, 10].tolist() == [255, 128, 7]  # channels first; the centre of the crop is the band


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers on 2 cores, on purpose
def test_embed_split_through_loader_workers_is_the_in_process_result(uneven_shards, tokenizer):
    """Workers decode interleaved batches; the DataLoader hands them back in order: same embeddings, same recalls."""
    cfg = resolve_config("small", ["image.size=32"])
    torch.manual_seed(0)
    model = MSAModel(cfg)
    urls = read_manifest(uneven_shards).shard_urls("train")

    def embedded(workers):
        return embed_split(model, urls, transform=ImageTransform.from_config(cfg), tokenizer=tokenizer,
                           max_tokens=31, batch_size=4, num_workers=workers)

    alone, pooled = embedded(0), embedded(3)  # 27 images: 7 batches, the last short, workers uneven
    assert pooled.keys == alone.keys == [s.key for s in iterate_samples(urls)]
    assert pooled.captions == alone.captions and torch.equal(pooled.caption_image, alone.caption_image)
    assert torch.equal(pooled.image_emb, alone.image_emb) and torch.equal(pooled.text_emb, alone.text_emb)
    assert evaluate_recall(pooled) == evaluate_recall(alone)


def test_pipeline_rejects_an_epoch_with_no_full_batch(uneven_shards, tokenizer):
    with pytest.raises(ValueError, match="steps_per_epoch"):
        PairBatches([], transform=ImageTransform(32), tokenizer=tokenizer, max_tokens=31, batch_size=8,
                    steps_per_epoch=0)
