"""What every section of ``msa.bench`` shares: the resolved run, the model, random inputs, the synthetic corpus."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msa.bench.common import comparability, log

_WORDS = ("a", "the", "many", "green", "trees", "are", "near", "two", "white", "buildings", "and", "some", "cars",
          "parked", "beside", "road", "river", "bridge", "over", "large", "airport", "with", "planes", "farmland",
          "square", "playground", "in", "of", "on", "is", "surrounded", "by", "storage", "tanks", "port", "ships")


@dataclasses.dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    cfg: Any
    bf16: bool
    channels_last: bool
    results: dict[str, Any]
    _model: nn.Module | None = None
    _corpus: dict[str, Any] | None = None
    _tokenizer: Any = None
    tmp: Path | None = None

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def comparability(self) -> str:
        return comparability(self.device.type, self.cfg.preset)

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            from msa.model import MSAModel

            log(f"building the {self.cfg.preset} model (random init)")
            torch.manual_seed(0)
            model = MSAModel(self.cfg).to(self.device)
            if self.channels_last:
                model.image.to(memory_format=torch.channels_last)
            self._model = model
        return self._model

    @property
    def seq(self) -> int:
        return self.cfg.text.max_tokens

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from msa.encoders import WeightsUnavailableError, build_tokenizer

            source = self.cfg.text.tokenizer or self.cfg.text.model
            try:
                self._tokenizer = build_tokenizer(source)
            except (WeightsUnavailableError, OSError) as e:
                fallback = "packaged:all-minilm-l6-v2"  # the bert-base-uncased vocabulary, shipped in a package
                log(f"tokenizer {source!r} unavailable ({type(e).__name__}); using {fallback!r}")
                self._tokenizer = build_tokenizer(fallback)
        return self._tokenizer

    def images(self, n: int) -> Tensor:
        size = self.cfg.image.size
        x = torch.randn(n, 3, size, size, device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def captions(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Random captions of 6 to max_tokens words, through the model's own tokenizer (BERT's or CLIP's), so
        that ids, padding and end tokens are what training sees."""
        from msa.encoders import tokenize

        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(min(6, self.seq), self.seq + 1, (n,), generator=g).tolist()
        words = torch.randint(len(_WORDS), (n, self.seq), generator=g).tolist()
        texts = [" ".join(_WORDS[w] for w in row[:length]) for row, length in zip(words, lengths)]
        ids, mask = tokenize(self.tokenizer, texts, self.seq)
        return ids.to(self.device), mask.to(self.device)

    def corpus(self) -> dict[str, Any]:
        """A synthetic shard set (train + test splits) at the model's image size, built once per run."""
        if self._corpus is None:
            from shards.manifest import read_manifest
            from shards.synth import generate_corpus
            from shards.writer import write_shards

            a = self.args
            px = a.loader_image_px or self.cfg.image.size
            splits = {"train": a.loader_images, "test": a.e2e_images}
            workers = 1 if self.device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))
            log(f"generating a synthetic corpus {splits} at {px}px")
            t0 = time.perf_counter()
            ann = generate_corpus(self.tmp / "corpus", splits=splits, image_size=px, seed=0, workers=workers)
            uri = str(self.tmp / "shards")
            write_shards(ann, ann.parent / "images", uri, shard_size=max(1, a.loader_images // 4), progress=False)
            manifest = read_manifest(uri)
            self._corpus = {
                "uri": uri,
                "image_px": px,
                "train_urls": manifest.shard_urls("train"),
                "test_urls": manifest.shard_urls("test"),
                "train_images": manifest.splits["train"].images,
                "train_pairs": manifest.splits["train"].captions,
                "test_images": manifest.splits["test"].images,
                "build_s": time.perf_counter() - t0,
            }
        return self._corpus
