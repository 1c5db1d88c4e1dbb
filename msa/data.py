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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from msa.config import MSAConfig
from msa.encoders import tokenize

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "tif", "tiff")
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
T = TypeVar("T")


class ImageTransform:
    """Resize the shorter side to ``size`` and centre-crop square: a uint8 [3, size, size] tensor (spec section 4).

    Normalisation is not done here but on the model's device (``msa.model.ImageNormalize``), so loader
    workers only decode and resize and ship a quarter of the bytes. The crop is a no-op on the square
    images of every supported corpus; it only makes odd shapes batchable. No augmentation: train and test
    use the same transform. The filter is the config's (the backbone's own: ``ImageConfig.interpolation``).
    """

    def __init__(self, size: int, interpolation: str = "bilinear"):
        self.size = size
        self.resample = _RESAMPLE[interpolation]

    @classmethod
    def from_config(cls, cfg: MSAConfig) -> ImageTransform:
        """The transform a resolved config's image section describes (size, interpolation)."""
        if cfg.image.interpolation is None:
            raise ValueError("image.interpolation is unset: build the config with msa.config.resolve_config")
        return cls(cfg.image.size, cfg.image.interpolation)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # numpy's HWC -> CHW copy is about twice as fast as torch's strided one; contiguous images stack fast.
        pixels = np.asarray(self.resized(image), dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def resized(self, image: Image.Image) -> Image.Image:
        """The RGB image, resized and cropped."""
        if image.mode != "RGB":
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
        return image


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


def _raw_samples(urls: list[str], key_filter: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """Raw (undecoded) samples of the given shards in order (single process)."""
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    for raw in dataset:
        if key_filter is None or key_filter(raw["__key__"]):
            yield raw


def iterate_samples(urls: list[str], key_filter: Callable[[str], bool] | None = None) -> Iterator[Sample]:
    """Samples of the given shards in order (single process)."""
    return map(decode_sample, _raw_samples(urls, key_filter))


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


class SplitImages(IterableDataset):
    """A split's images in shard order, ``batch_size`` at a time: uint8 ``images`` with their ``keys`` and
    ``captions`` (a list per image), for evaluation.

    With W loader workers, worker w decodes batches w, w + W, ... (it reads every shard but skips the other
    workers' samples undecoded); the DataLoader takes one batch from each worker in turn, so the batches
    arrive exactly as one process makes them and embeddings and recalls do not depend on the worker count.
    """

    def __init__(self, urls: list[str], transform: ImageTransform, batch_size: int,
                 key_filter: Callable[[str], bool] | None = None):
        self.urls, self.transform, self.batch_size, self.key_filter = list(urls), transform, batch_size, key_filter

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index, chunk in enumerate(chunked(_raw_samples(self.urls, self.key_filter), self.batch_size)):
            if index % workers != worker:
                continue
            samples = [decode_sample(r) for r in chunk]
            yield {
                "images": torch.stack([self.transform(s.image) for s in samples]),
                "keys": [s.key for s in samples],
                "captions": [s.captions for s in samples],
            }


def _assign(urls: list[str], slot: int, slots: int, rng: random.Random) -> tuple[list[str], int | None]:
    """Shards for one (rank, loader worker) slot, or all shards plus a sample stride when too few."""
    order = list(urls)
    rng.shuffle(order)
    if len(order) >= slots:
        return order[slot::slots], None
    return order, slot


@dataclass(frozen=True)
class PairSource:
    """The training shards of one corpus in a pair stream; ``share`` weighs it against the others."""

    urls: tuple[str, ...]
    key_filter: Callable[[str], bool] | None = None
    share: float = 1.0  # a mix draws each pair from a source with probability proportional to its share


class PairBatches(IterableDataset):
    """Shuffled (image, caption) pairs as tokenised batches; a fixed batch count per rank per epoch.

    ``urls`` (and ``key_filter``) name one corpus; ``sources`` several, mixed into one stream (joint
    training): every slot (rank x loader worker) reads its share of each corpus's shards and draws each
    pair from a corpus with probability proportional to its ``share``. One source yields exactly the
    single-corpus stream.
    """

    def __init__(
        self,
        urls: Sequence[str] = (),
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
        sources: Sequence[PairSource] = (),
        shuffle_buffer: int = 2000,
    ):
        if steps_per_epoch < 1:
            raise ValueError("steps_per_epoch must be >= 1: the split has fewer pairs than one global batch")
        if bool(urls) == bool(sources):
            raise ValueError("PairBatches reads either urls (one corpus) or sources (a mix), not both")
        self.sources = list(sources) or [PairSource(tuple(urls), key_filter)]
        self.transform = transform
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.steps_per_epoch = steps_per_epoch
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def assignment(self, worker: int = 0, workers: int = 1) -> list[tuple[list[str], tuple[int, int] | None]]:
        """Per source, this epoch's shards for one loader worker of this rank, and a sample stride when
        shards are too few."""
        slot, slots = self.rank * workers + worker, self.world_size * workers
        out = []
        for i, source in enumerate(self.sources):
            rng = random.Random(f"shards-{self.seed}-{self.epoch}" + (f"-{i}" if i else ""))
            urls, sample_slot = _assign(list(source.urls), slot, slots, rng)
            out.append((urls, None if sample_slot is None else (sample_slot, slots)))
        return out

    def _pairs(self, urls: list[str], stride: tuple[int, int] | None,
               key_filter: Callable[[str], bool] | None) -> Iterator[tuple]:
        for index, sample in enumerate(iterate_samples(urls, key_filter)):
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
        slot = self.rank * workers + worker

        def cycle(i: int, urls: list[str], stride: tuple[int, int] | None) -> Iterator[tuple]:
            rng = random.Random(f"pairs-{self.seed}-{self.epoch}-{slot}" + (f"-{i}" if i else ""))
            for _ in itertools.count():
                produced = False
                for pair in self._shuffled(self._pairs(urls, stride, self.sources[i].key_filter), rng):
                    produced = True
                    yield pair
                if not produced:
                    raise RuntimeError(f"rank {self.rank} worker {worker}: no samples in its shards {urls}")

        streams = [cycle(i, urls, stride) for i, (urls, stride) in enumerate(self.assignment(worker, workers))]
        pairs = streams[0] if len(streams) == 1 else _mixed(
            streams, [s.share for s in self.sources], random.Random(f"mix-{self.seed}-{self.epoch}-{slot}"))
        for _ in range(steps):
            batch = [next(pairs) for _ in range(self.batch_size)]
            images, captions, image_ids = zip(*batch)
            input_ids, attention_mask = tokenize(self.tokenizer, list(captions), self.max_tokens)
            yield {
                "images": default_collate(list(images)),  # in a loader worker: stacked in shared memory, not copied
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "image_ids": torch.tensor(image_ids, dtype=torch.long),
            }


def _mixed(streams: list[Iterator[tuple]], shares: list[float], rng: random.Random) -> Iterator[tuple]:
    """Pairs drawn from ``streams`` with probabilities proportional to ``shares``."""
    while True:
        yield next(rng.choices(streams, weights=shares)[0])


def steps_per_epoch(num_pairs: int, batch_size: int, world_size: int) -> int:
    """Global batches in one pass over the pairs (the remainder is dropped, as DDP samplers do)."""
    return max(1, math.floor(num_pairs / (batch_size * world_size)))


def pair_loader(dataset: PairBatches | SplitImages, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over this module's already-batched datasets (training pairs or a split's images)."""
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
    """Shard URLs for training and validation; validation is carved from train when a corpus has none.

    In joint training each corpus has its own plan: ``name`` prefixes its validation metrics and
    ``weight`` scales its pairs' share of an epoch (``msa.runtime.datasets.DataMix``).
    """

    train_urls: list[str]
    val_urls: list[str]
    train_pairs: int
    carved_fraction: float | None = None
    name: str = ""
    weight: float = 1.0

    @property
    def epoch_pairs(self) -> float:
        """Training pairs this corpus contributes to one epoch."""
        return self.weight * self.train_pairs

    def train_source(self) -> PairSource:
        return PairSource(tuple(self.train_urls), self.train_filter(), share=self.epoch_pairs)

    def train_filter(self) -> Callable[[str], bool] | None:
        fraction = self.carved_fraction
        return None if fraction is None else (lambda key: not is_carved_validation(key, fraction))

    def val_filter(self) -> Callable[[str], bool] | None:
        fraction = self.carved_fraction
        return None if fraction is None else (lambda key: is_carved_validation(key, fraction))


def plan_splits(manifest, val_fraction: float, *, name: str = "", weight: float = 1.0) -> SplitPlan:
    """The plan for a shard manifest (anything with ``digest``, ``splits`` and ``shard_urls(split)``)."""
    train = manifest.splits.get("train")
    if train is None or train.images == 0:
        raise ValueError(f"shard set {manifest.digest[:16]} has no train split")
    val = manifest.splits.get("val")
    if val is not None and val.images > 0:
        return SplitPlan(manifest.shard_urls("train"), manifest.shard_urls("val"), train.captions,
                         name=name, weight=weight)
    pairs = int(train.captions * (1.0 - val_fraction))
    return SplitPlan(manifest.shard_urls("train"), manifest.shard_urls("train"), pairs, val_fraction,
                     name=name, weight=weight)
