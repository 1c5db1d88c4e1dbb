"""The retrieval index: its file format, loading and validation, building, and the model check.

An index is a directory written atomically by ``build_index`` (temp dir, then rename)::

    meta.json               format, model source (and pinned registry version), dataset digest, split,
                            counts, dims, creation time and a probe that pins the model (written last)
    image_emb.npy           [N, D] float32, L2-normalised global image embeddings v
    text_emb.npy            [M, D] float32, L2-normalised caption [CLS]
    caption_image.npy       [M] int64, the image index of each caption
    image_scales_<k>.npy    [N, C_k] float32, the pooled stage vectors s_k (k = 0..K-1) MSCMAT needs
    image_keys.json         [N] shard sample keys
    captions.json           [M] caption strings

Caption token states are recomputed from the text (cheap), so only the image side's scale vectors
are stored. The probe in meta.json (embeddings of a fixed caption and a fixed image) lets
``check_model`` refuse to search an index with any model other than the one it was built with.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from msa.data import iterate_samples
from msa.evaluate import chunked
from msa.retrieval.constants import DEFAULT_INDEX_BATCH_SIZE, DEFAULT_INDEX_SPLIT
from msa.runtime.resolver import ResolvedModel, resolve_model

INDEX_FORMAT = "msa-retrieval-index"
INDEX_FORMAT_VERSION = 1
META_FILE = "meta.json"
IMAGE_EMB_FILE = "image_emb.npy"
TEXT_EMB_FILE = "text_emb.npy"
CAPTION_IMAGE_FILE = "caption_image.npy"
IMAGE_KEYS_FILE = "image_keys.json"
CAPTIONS_FILE = "captions.json"
PROBE_TEXT = "a probe caption that pins the model an msa index was built with"
# Probe embeddings of the index's model and the searching model must agree this well (cosine);
# float32 on CPU vs GPU agrees to ~1e-6, any other weights to far less.
PROBE_MIN_COSINE = 0.999


def scale_file(k: int) -> str:
    return f"image_scales_{k}.npy"


class IndexFormatError(ValueError):
    """An index directory is missing, incomplete or corrupt; the message names the file."""


class ModelIndexMismatch(ValueError):
    """The model searching an index is not the model (or the architecture) the index was built with."""


# ------------------------------------------------------------------------------------------ probe


def _probe_pixels(size: int) -> torch.Tensor:
    """A fixed, non-trivial normalised-range image [1, 3, size, size] used to fingerprint the image tower."""
    ramp = torch.linspace(-2.0, 2.0, size)
    return torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        (ramp[None, :] * ramp[:, None]).clamp(-2, 2)])[None]


@torch.no_grad()
def model_probe(model: ResolvedModel) -> dict[str, Any]:
    text = model.encode_texts([PROBE_TEXT])[0][0]
    image = model.encode_images(_probe_pixels(model.cfg.image.size))[0][0]
    return {
        "text": PROBE_TEXT,
        "image_size": model.cfg.image.size,
        "text_emb": [round(float(x), 7) for x in text.cpu()],
        "image_emb": [round(float(x), 7) for x in F.normalize(image, dim=0).cpu()],
    }


# ------------------------------------------------------------------------------------------ index


@dataclass
class Index:
    """A loaded index; arrays stay numpy on the host, ``tensors(device)`` caches device copies."""

    path: Path
    meta: dict[str, Any]
    image_emb: np.ndarray  # [N, D] float32
    text_emb: np.ndarray  # [M, D] float32
    caption_image: np.ndarray  # [M] int64
    image_scales: list[np.ndarray]  # K x [N, C_k] float32
    image_keys: list[str]
    captions: list[str]
    _device_cache: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _verified: dict[int, weakref.ref] = field(default_factory=dict, repr=False)  # models that passed check_model

    @property
    def num_images(self) -> int:
        return len(self.image_keys)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def dim(self) -> int:
        return int(self.image_emb.shape[1])

    def tensors(self, device: torch.device | str) -> dict[str, Any]:
        key = str(torch.device(device))
        if key not in self._device_cache:
            self._device_cache[key] = {
                "image_emb": torch.from_numpy(self.image_emb).to(device),
                "text_emb": torch.from_numpy(self.text_emb).to(device),
                "caption_image": torch.from_numpy(self.caption_image).to(device),
                "scales": [torch.from_numpy(s).to(device) for s in self.image_scales],
            }
        return self._device_cache[key]

    def images_of(self, caption_index: int) -> str:
        return self.image_keys[int(self.caption_image[caption_index])]

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Index:
        """Read and validate an index; every problem raises ``IndexFormatError`` naming the file."""
        path = Path(directory)
        if not path.is_dir():
            raise IndexFormatError(f"{path}: no such index directory (build one with `msa index`)")
        meta = _read_json(path / META_FILE, "the index metadata; is this an `msa index` output?")
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise IndexFormatError(f"{path / META_FILE}: not an msa retrieval index (format {meta.get('format')!r})"
                                   if isinstance(meta, dict) else f"{path / META_FILE}: not a JSON object")
        if meta.get("format_version") != INDEX_FORMAT_VERSION:
            raise IndexFormatError(
                f"{path / META_FILE}: index format version {meta.get('format_version')!r}, this code reads "
                f"{INDEX_FORMAT_VERSION}; rebuild the index with `msa index`"
            )
        try:
            n, m = int(meta["counts"]["images"]), int(meta["counts"]["captions"])
            d, scale_dims = int(meta["dims"]["embed"]), [int(c) for c in meta["dims"]["scales"]]
        except (KeyError, TypeError, ValueError) as e:
            raise IndexFormatError(f"{path / META_FILE}: missing or invalid field {e}") from e

        image_emb = _read_array(path / IMAGE_EMB_FILE, (n, d), np.float32)
        text_emb = _read_array(path / TEXT_EMB_FILE, (m, d), np.float32)
        caption_image = _read_array(path / CAPTION_IMAGE_FILE, (m,), np.int64)
        if m and (caption_image.min() < 0 or caption_image.max() >= n):
            raise IndexFormatError(f"{path / CAPTION_IMAGE_FILE}: image indices outside [0, {n})")
        scales = [_read_array(path / scale_file(k), (n, c), np.float32) for k, c in enumerate(scale_dims)]
        keys = _read_json(path / IMAGE_KEYS_FILE, "the image keys")
        captions = _read_json(path / CAPTIONS_FILE, "the captions")
        for file, values, count in ((IMAGE_KEYS_FILE, keys, n), (CAPTIONS_FILE, captions, m)):
            if not isinstance(values, list) or len(values) != count or not all(isinstance(v, str) for v in values):
                raise IndexFormatError(f"{path / file}: expected a list of {count} strings (meta.json counts)")
        return cls(path, meta, image_emb, text_emb, caption_image, scales, keys, captions)


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"{path}: unreadable or corrupt JSON ({e})") from e


def _read_array(path: Path, shape: tuple[int, ...], dtype) -> np.ndarray:
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing (the index is incomplete; rebuild it with `msa index`)")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise IndexFormatError(f"{path}: unreadable or corrupt .npy ({e})") from e
    if array.shape != shape or array.dtype != dtype:
        raise IndexFormatError(
            f"{path}: shape {array.shape} dtype {array.dtype}, expected {shape} {np.dtype(dtype)} from meta.json"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise IndexFormatError(f"{path}: contains NaN or infinite values")
    return array


def check_model(index: Index, model: ResolvedModel) -> None:
    """Raise ``ModelIndexMismatch`` unless ``model`` has the index's dims and reproduces its probe."""
    seen = index._verified.get(id(model))
    if seen is not None and seen() is model:
        return
    where = index.path / META_FILE
    built_with = index.meta.get("model", {}).get("resolved")
    if model.embed_dim != index.dim:
        raise ModelIndexMismatch(
            f"dimension mismatch: model {model.source} embeds into D={model.embed_dim}, but index {index.path} "
            f"holds D={index.dim} embeddings (built with {built_with}); use that model or rebuild the index"
        )
    stored_scales = [s.shape[1] for s in index.image_scales]
    if list(model.scale_dims) != stored_scales:
        raise ModelIndexMismatch(
            f"dimension mismatch: model {model.source} has image scale dims {list(model.scale_dims)}, index "
            f"{index.path} stores {stored_scales} (built with {built_with})"
        )
    probe = index.meta.get("probe")
    if not probe:
        raise IndexFormatError(f"{where}: no model probe recorded")
    current = model_probe(model)
    for name in ("text_emb", "image_emb"):
        cos = float(np.dot(np.asarray(probe[name]), np.asarray(current[name])))
        if cos < PROBE_MIN_COSINE:
            raise ModelIndexMismatch(
                f"model mismatch: {model.source} is not the model index {index.path} was built with "
                f"({built_with}); their {name.split('_')[0]} embeddings of a fixed probe differ (cosine "
                f"{cos:.4f}). Search with --model {built_with} or rebuild the index with this model"
            )
    index._verified[id(model)] = weakref.ref(model)


# ------------------------------------------------------------------------------------------ build


@torch.no_grad()
def embed_for_index(
    model: ResolvedModel, urls: list[str], batch_size: int = DEFAULT_INDEX_BATCH_SIZE
) -> dict[str, Any]:
    """Every image (v and its K scale vectors) and every caption ([CLS]) of the shards, once, in order."""
    image_emb, scales, caption_image, keys, captions, text_emb = [], [], [], [], [], []
    for chunk in chunked(iterate_samples(urls), batch_size):
        pixels = torch.stack([model.transform(s.image) for s in chunk])
        v, feats = model.encode_images(pixels)
        image_emb.append(v.cpu())
        scales.append([f.cpu() for f in feats])
        for sample in chunk:
            caption_image.extend([len(keys)] * len(sample.captions))
            keys.append(sample.key)
            captions.extend(sample.captions)
    if not keys:
        raise ValueError(f"no samples in {urls}")
    for start in range(0, len(captions), batch_size):
        text_emb.append(model.encode_texts(captions[start : start + batch_size])[0].cpu())
    return {
        "image_emb": torch.cat(image_emb).numpy().astype(np.float32),
        "text_emb": (torch.cat(text_emb) if text_emb else torch.zeros(0, model.embed_dim)).numpy().astype(np.float32),
        "caption_image": np.asarray(caption_image, dtype=np.int64),
        "image_scales": [torch.cat(parts).numpy().astype(np.float32) for parts in zip(*scales)],
        "image_keys": keys,
        "captions": captions,
    }


def build_index(
    model_source: str | os.PathLike[str] | ResolvedModel,
    data_uri: str,
    out_dir: str | os.PathLike[str],
    split: str = DEFAULT_INDEX_SPLIT,
    batch_size: int = DEFAULT_INDEX_BATCH_SIZE,
    storage_options: dict | None = None,
) -> Path:
    """Embed ``split`` of the shard set at ``data_uri`` once and write the index to ``out_dir`` atomically.

    ``model_source`` is a ``ResolvedModel`` or anything ``resolve_model`` accepts (a checkpoint
    directory or an MLflow model URI). ``out_dir`` is replaced if it already holds an index; any
    other non-empty directory is refused. Returns the index path.
    """
    from shards.manifest import read_manifest
    from shards.storage import register_webdataset_s3

    started = time.perf_counter()
    out = Path(out_dir).expanduser().absolute()
    _check_replaceable(out)
    model = model_source if isinstance(model_source, ResolvedModel) else resolve_model(model_source)
    register_webdataset_s3(storage_options or {})
    manifest = read_manifest(data_uri, storage_options)
    info = manifest.splits.get(split)
    if info is None or info.images == 0:
        raise ValueError(f"shard set {data_uri} has no {split!r} split (splits: {sorted(manifest.splits)})")
    embedded = embed_for_index(model, manifest.shard_urls(split), batch_size)
    n, m = len(embedded["image_keys"]), len(embedded["captions"])
    if (n, m) != (info.images, info.captions):
        raise ValueError(f"{data_uri} {split}: read {n} images / {m} captions, manifest says "
                         f"{info.images} / {info.captions}")
    meta = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "source": model.source,
            "resolved": model.resolved,
            "registry": model.registry,
            "checkpoint_epoch": model.checkpoint_epoch,
            "trained_on_digest": model.trained_on,
            "preset": model.cfg.preset,
        },
        "data": {"uri": data_uri, "split": split, "dataset_digest": manifest.digest, "corpus": manifest.corpus},
        "counts": {"images": n, "captions": m},
        "dims": {"embed": model.embed_dim, "scales": list(model.scale_dims)},
        "probe": model_probe(model),
        "build_seconds": None,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        np.save(tmp / IMAGE_EMB_FILE, embedded["image_emb"])
        np.save(tmp / TEXT_EMB_FILE, embedded["text_emb"])
        np.save(tmp / CAPTION_IMAGE_FILE, embedded["caption_image"])
        for k, array in enumerate(embedded["image_scales"]):
            np.save(tmp / scale_file(k), array)
        (tmp / IMAGE_KEYS_FILE).write_text(json.dumps(embedded["image_keys"]))
        (tmp / CAPTIONS_FILE).write_text(json.dumps(embedded["captions"], ensure_ascii=False))
        meta["build_seconds"] = round(time.perf_counter() - started, 3)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
