"""WebDataset input pipeline: shards -> decoded, transformed, tokenised batches.

Decoding, resizing and tokenisation run in DataLoader workers, a whole batch of captions per
tokeniser call. For DDP every rank yields exactly the same number of batches per epoch (its
stream cycles when its shards run short), so collective ops never wait on a rank that finished.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from msa.config import IMAGENET_MEAN, IMAGENET_STD, MSAConfig
from msa.encoders import tokenize

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "tif", "tiff")
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


class ImageTransform:
    """Resize the shorter side to ``size``, centre-crop square, normalise (spec section 4: ImageNet, bilinear).

    The crop is a no-op on the square images of every supported corpus; it only makes odd
    shapes batchable. No augmentation: train and test use the same transform. A pretrained tower
    needs its own statistics and filter (CLIP: bicubic, CLIP mean/std): see ``from_config``.
    """

    def __init__(
        self,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
    ):
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.resample = _RESAMPLE[interpolation]

    @classmethod
    def from_config(cls, cfg: MSAConfig) -> ImageTransform:
        """The transform a config's image section describes (size, mean, std, interpolation)."""
        image = cfg.image
        return cls(image.size, image.mean, image.std, image.interpolation)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        if (w, h) != (self.size, self.size):
            # torchvision's Resize(size) + CenterCrop(size) arithmetic (truncated long side, rounded offsets),
            # so open_clip's preprocessing is matched on any shape, not only on square images.
            long = int(self.size * max(w, h) / min(w, h))
            w, h = (self.size, long) if w <= h else (long, self.size)
            image = image.resize((w, h), self.resample)
            left, top = int(round((w - self.size) / 2.0)), int(round((h - self.size) / 2.0))
            image = image.crop((left, top, left + self.size, top + self.size))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        return (pixels - self.mean) / self.std


@dataclass
class Sample:
    key: str
    image: Image.Image
    captions: list[str]


def decode_sample(raw: dict) -> Sample:
    """One raw webdataset sample (bytes per member) -> image and captions, naming the shard on error."""
    where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
    ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
    if ext is None or "json" not in raw:
        raise ValueError(f"{where}: sample lacks an image member or its json member (has {sorted(raw)})")
    meta = json.loads(raw["json"])
    image = Image.open(io.BytesIO(raw[ext]))
    image.load()
    return Sample(raw["__key__"], image, list(meta["captions"]))


def is_carved_validation(key: str, fraction: float) -> bool:
    """Deterministic, order-free choice of the train images that stand in for a missing val split."""
    digest = hashlib.sha1(key.encode()).digest()
    return int.from_bytes(digest[:4], "big") < fraction * 2**32


def iterate_samples(urls: list[str], key_filter: Callable[[str], bool] | None = None) -> Iterator[Sample]:
    """Samples of the given shards in order (single process)."""
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for raw in dataset:
        if key_filter is None or key_filter(raw["__key__"]):
            yield decode_sample(raw)


def _assign(urls: list[str], slot: int, slots: int, rng: random.Random) -> tuple[list[str], int | None]:
    """Shards for one (rank, loader worker) slot, or all shards plus a sample stride when too few."""
    order = list(urls)
    rng.shuffle(order)
    if len(order) >= slots:
        return order[slot::slots], None
    return order, slot


class PairBatches(IterableDataset):
    """Shuffled (image, caption) pairs as tokenised batches; a fixed batch count per rank per epoch."""

    def __init__(
        self,
        urls: list[str],
        *,
        transform: ImageTransform,
        tokenizer,
        max_tokens: int,
        batch_size: int,
        steps_per_epoch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        key_filter: Callable[[str], bool] | None = None,
        shuffle_buffer: int = 2000,
    ):
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1: the split has fewer pairs than one global batch")
        self.urls = list(urls)
        self.transform = transform
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.key_filter = key_filter
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def assignment(self, worker: int = 0, workers: int = 1) -> tuple[list[str], tuple[int, int] | None]:
        """This epoch's shards for one loader worker of this rank, and a sample stride when shards are too few."""
        slot, slots = self.rank * workers + worker, self.world_size * workers
        urls, sample_slot = _assign(self.urls, slot, slots, random.Random(f"shards-{self.seed}-{self.epoch}"))
        return urls, None if sample_slot is None else (sample_slot, slots)

    def _pairs(self, urls: list[str], stride: tuple[int, int] | None) -> Iterator[tuple]:
        for index, sample in enumerate(iterate_samples(urls, self.key_filter)):
            if stride is not None and index % stride[1] != stride[0]:
                continue
            pixels = self.transform(sample.image)
            image_id = int.from_bytes(hashlib.sha1(sample.key.encode()).digest()[:7], "big")
            for caption in sample.captions:
                yield pixels, caption, image_id

    def _shuffled(self, pairs: Iterator[tuple], rng: random.Random) -> Iterator[tuple]:
        buffer: list[tuple] = []
        for pair in pairs:
            buffer.append(pair)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # Worker w of every rank yields the same share, so ranks agree on the total.
        steps = self.steps_per_epoch // workers + (1 if worker < self.steps_per_epoch % workers else 0)
        rng = random.Random(f"pairs-{self.seed}-{self.epoch}-{self.rank * workers + worker}")
        urls, stride = self.assignment(worker, workers)

        def cycle() -> Iterator[tuple]:
            for _ in itertools.count():
                produced = False
                for pair in self._shuffled(self._pairs(urls, stride), rng):
                    produced = True
                    yield pair
                if not produced:
                    raise RuntimeError(f"rank {self.rank} worker {worker}: no samples in its shards {urls}")

        pairs = cycle()
        for _ in range(steps):
            batch = [next(pairs) for _ in range(self.batch_size)]
            images, captions, image_ids = zip(*batch)
            input_ids, attention_mask = tokenize(self.tokenizer, list(captions), self.max_tokens)
            yield {
                "images": torch.stack(images),
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "image_ids": torch.tensor(image_ids, dtype=torch.long),
            }


def steps_per_epoch(num_pairs: int, batch_size: int, world_size: int) -> int:
    """Global batches in one pass over the pairs (the remainder is dropped, as DDP samplers do)."""
    return max(1, math.floor(num_pairs / (batch_size * world_size)))


def pair_loader(dataset: PairBatches, num_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )


@dataclass(frozen=True)
class SplitPlan:
    """Shard URLs for training and validation; validation is carved from train when a corpus has none."""

    train_urls: list[str]
    val_urls: list[str]
    train_pairs: int
    carved_fraction: float | None = None

    def train_filter(self) -> Callable[[str], bool] | None:
        fraction = self.carved_fraction
        return None if fraction is None else (lambda key: not is_carved_validation(key, fraction))

    def val_filter(self) -> Callable[[str], bool] | None:
        fraction = self.carved_fraction
        return None if fraction is None else (lambda key: is_carved_validation(key, fraction))


def plan_splits(manifest, val_fraction: float) -> SplitPlan:
    """The plan for a shard manifest (anything with ``digest``, ``splits`` and ``shard_urls(split)``)."""
    train = manifest.splits.get("train")
    if train is None or train.images == 0:
        raise ValueError(f"shard set {manifest.digest[:16]} has no train split")
    val = manifest.splits.get("val")
    if val is not None and val.images > 0:
        return SplitPlan(manifest.shard_urls("train"), manifest.shard_urls("val"), train.captions)
    pairs = int(train.captions * (1.0 - val_fraction))
    return SplitPlan(manifest.shard_urls("train"), manifest.shard_urls("train"), pairs, val_fraction)
