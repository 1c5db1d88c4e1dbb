"""Writing an index: ``IndexWriter`` streams vectors into float16 memmaps in a temp directory and renames
it into place; ``build_index`` feeds it a shard split embedded by a model.

Memory stays bounded by a batch: the writer preallocates every array at its final size (the counts
come from the shard manifest) and each batch is written into its rows, so a million images never sit
in RAM as float32. The optional faiss IVF indexes (``msa.retrieval.backends``) are built from the
finished memmaps inside the same temp directory, before meta.json, which is written last.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msa.data import chunked, iterate_samples
from msa.retrieval.backends import build_ivf
from msa.retrieval.constants import (
    ANN_AUTO_MIN_VECTORS,
    ANN_MODES,
    DEFAULT_ANN_MODE,
    DEFAULT_INDEX_BATCH_SIZE,
    DEFAULT_INDEX_SPLIT,
)
from msa.retrieval.index import (
    ANN_FILES,
    CAPTION_IMAGE_FILE,
    CAPTIONS_FILE,
    IMAGE_EMB_FILE,
    IMAGE_KEYS_FILE,
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    META_FILE,
    TEXT_EMB_FILE,
    VECTOR_DTYPE,
    model_probe,
    scale_file,
)
from msa.runtime.resolver import ResolvedModel, resolve_model
from shards.distributed import progress_bar


def wants_ann(mode: str, count: int) -> bool:
    """Whether a side of ``count`` vectors gets an ANN index: "always", "never", or "auto" (from
    ``ANN_AUTO_MIN_VECTORS`` vectors, where exact search starts to cost tenths of a second per query)."""
    if mode not in ANN_MODES:
        raise ValueError(f"ann must be one of {ANN_MODES}, got {mode!r}")
    return count > 0 and (mode == "always" or (mode == "auto" and count >= ANN_AUTO_MIN_VECTORS))


class IndexWriter:
    """An index being written: ``add_images`` / ``add_captions`` fill preallocated rows in order,
    ``commit`` checks every row was written, builds the ANN indexes, writes meta.json and renames the
    directory into place. Use as a context manager: leaving it without ``commit`` removes the temp dir.

    ``source`` names where the rows come from, in errors about their number or values."""

    def __init__(self, out: str | os.PathLike[str], images: int, captions: int, dim: int,
                 scale_dims: Sequence[int], source: str):
        self.out = Path(out).expanduser().absolute()
        self.source = source
        self.counts = {"images": int(images), "captions": int(captions)}
        self.dims = {"embed": int(dim), "scales": [int(c) for c in scale_dims]}
        self.images_written = self.captions_written = 0
        self.keys: list[str] = []
        self.captions: list[str] = []
        self.started = time.perf_counter()
        _check_replaceable(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp: Path | None = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.tmp-"))
        try:
            self.image_emb = self._array(IMAGE_EMB_FILE, (images, dim), VECTOR_DTYPE)
            self.text_emb = self._array(TEXT_EMB_FILE, (captions, dim), VECTOR_DTYPE)
            self.caption_image = self._array(CAPTION_IMAGE_FILE, (captions,), np.int64)
            self.image_scales = [self._array(scale_file(k), (images, c), VECTOR_DTYPE)
                                 for k, c in enumerate(self.dims["scales"])]
        except BaseException:
            self.abort()
            raise

    def _array(self, name: str, shape: tuple[int, ...], dtype) -> np.memmap:
        return np.lib.format.open_memmap(self.tmp / name, mode="w+", dtype=dtype, shape=shape)

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def abort(self) -> None:
        """Remove the temp directory (a no-op after ``commit``)."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def _rows(self, kind: str, written: int, count: int) -> slice:
        if written + count > self.counts[kind]:
            raise ValueError(f"{self.source}: more than the {self.counts[kind]} {kind} declared")
        return slice(written, written + count)

    def _store(self, target: np.ndarray, rows: slice, values: torch.Tensor | np.ndarray, file: str) -> None:
        values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below, with the file named
            target[rows] = values
        if not np.isfinite(target[rows]).all():
            raise ValueError(f"{self.source}: NaN, infinite or beyond-float16 values for rows {rows.start}.."
                             f"{rows.stop - 1} of {file}")

    def add_images(self, emb: torch.Tensor | np.ndarray, scales: Sequence[torch.Tensor | np.ndarray],
                   keys: Sequence[str]) -> int:
        """Write the next images' embeddings [B, D], K scale vectors [B, C_k] and keys; returns the row
        index of the first."""
        rows = self._rows("images", self.images_written, len(keys))
        self._store(self.image_emb, rows, emb, IMAGE_EMB_FILE)
        for k, values in enumerate(scales):
            self._store(self.image_scales[k], rows, values, scale_file(k))
        self.keys.extend(keys)
        self.images_written = rows.stop
        return rows.start

    def add_captions(self, emb: torch.Tensor | np.ndarray, images: Sequence[int], captions: Sequence[str]) -> None:
        """Write the next captions' embeddings [B, D], their images' row indices and their text."""
        rows = self._rows("captions", self.captions_written, len(captions))
        self._store(self.text_emb, rows, emb, TEXT_EMB_FILE)
        self.caption_image[rows] = np.asarray(images, dtype=np.int64)
        self.captions.extend(captions)
        self.captions_written = rows.stop

    def commit(self, meta: dict[str, Any], ann: str = DEFAULT_ANN_MODE, progress: bool = False) -> Path:
        """Check the counts, build the ANN indexes ``ann`` asks for, write meta.json (``meta`` plus the
        format fields) last and rename the directory into place; returns its path."""
        written = {"images": self.images_written, "captions": self.captions_written}
        if written != self.counts:
            raise ValueError(f"{self.source}: read {written['images']} images / {written['captions']} captions, "
                             f"expected {self.counts['images']} / {self.counts['captions']}")
        for array in (self.image_emb, self.text_emb, self.caption_image, *self.image_scales):
            array.flush()
        ann_info = {
            side: build_ivf(vectors, self.tmp / ANN_FILES[side], progress, desc=f"ANN index ({side}s)")
            if wants_ann(ann, len(vectors)) else None
            for side, vectors in (("image", self.image_emb), ("text", self.text_emb))
        }
        (self.tmp / IMAGE_KEYS_FILE).write_text(json.dumps(self.keys))
        (self.tmp / CAPTIONS_FILE).write_text(json.dumps(self.captions, ensure_ascii=False))
        full = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            **meta,
            "counts": self.counts,
            "dims": self.dims,
            "dtype": np.dtype(VECTOR_DTYPE).name,
            "ann": ann_info,
            "build_seconds": round(time.perf_counter() - self.started, 3),
        }
        (self.tmp / META_FILE).write_text(json.dumps(full, indent=2))
        _swap_into_place(self.tmp, self.out)
        self.tmp = None
        return self.out


@torch.no_grad()
def embed_for_index(model: ResolvedModel, urls: list[str], writer: IndexWriter,
                    batch_size: int = DEFAULT_INDEX_BATCH_SIZE, progress: bool = False) -> None:
    """Every image (v and its K scale vectors) and every caption ([CLS]) of the shards, once, in order,
    written batch by batch into ``writer``."""
    with progress_bar(writer.counts["images"], "embedding", progress) as bar:
        for chunk in chunked(iterate_samples(urls), batch_size):
            v, feats = model.encode_images(torch.stack([model.transform(s.image) for s in chunk]))
            first = writer.add_images(v, feats, [s.key for s in chunk])
            captions = [c for s in chunk for c in s.captions]
            owners = [first + i for i, s in enumerate(chunk) for _ in s.captions]
            for start in range(0, len(captions), batch_size):
                part = slice(start, start + batch_size)
                writer.add_captions(model.encode_texts(captions[part])[0], owners[part], captions[part])
            bar.update(len(chunk))


def build_index(
    model_source: str | os.PathLike[str] | ResolvedModel,
    data_uri: str,
    out_dir: str | os.PathLike[str],
    split: str = DEFAULT_INDEX_SPLIT,
    batch_size: int = DEFAULT_INDEX_BATCH_SIZE,
    storage_options: dict | None = None,
    ann: str = DEFAULT_ANN_MODE,
    progress: bool = False,
) -> Path:
    """Embed ``split`` of the shard set at ``data_uri`` once and write the index to ``out_dir`` atomically.

    ``model_source`` is a ``ResolvedModel`` or anything ``resolve_model`` accepts (a checkpoint
    directory or an MLflow model URI). ``out_dir`` is replaced if it already holds an index; any
    other non-empty directory is refused. ``ann`` ("auto", "always", "never") says which sides get a
    faiss IVF index (``wants_ann``). ``progress`` shows tqdm bars on stderr. Returns the index path.
    """
    from msa.runtime.datasets import DataMix
    from shards.manifest import read_manifest
    from shards.storage import register_webdataset_s3

    wants_ann(ann, 0)  # refuse a bad mode before any work
    mix = DataMix.parse(data_uri)
    if mix.joint:
        raise ValueError(f"an index holds one shard set, but {data_uri!r} names a mix of "
                         f"{', '.join(c.name for c in mix.corpora)}: index each URI apart")
    out = Path(out_dir).expanduser().absolute()
    _check_replaceable(out)
    model = model_source if isinstance(model_source, ResolvedModel) else resolve_model(model_source)
    register_webdataset_s3(storage_options or {})
    manifest = read_manifest(data_uri, storage_options)
    info = manifest.splits.get(split)
    if info is None or info.images == 0:
        raise ValueError(f"shard set {data_uri} has no {split!r} split (splits: {sorted(manifest.splits)})")
    meta = {
        "model": {
            "source": model.source,
            "resolved": model.resolved,
            "registry": model.registry,
            "checkpoint_epoch": model.checkpoint_epoch,
            "trained_on_digest": model.trained_on,
            "preset": model.cfg.preset,
        },
        "data": {"uri": data_uri, "split": split, "dataset_digest": manifest.digest, "corpus": manifest.corpus},
        "probe": model_probe(model),
    }
    with IndexWriter(out, info.images, info.captions, model.embed_dim, model.scale_dims,
                     source=f"{data_uri} {split} (manifest)") as writer:
        embed_for_index(model, manifest.shard_urls(split), writer, batch_size, progress)
        return writer.commit(meta, ann=ann, progress=progress)


def _check_replaceable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        try:
            is_index = json.loads((out / META_FILE).read_text()).get("format") == INDEX_FORMAT
        except (OSError, ValueError, AttributeError):
            is_index = False
        if not is_index:
            raise FileExistsError(f"{out}: a non-empty directory that is not an msa index; refusing to replace it")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir to ``out``; an existing index is moved aside first, then deleted."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
