"""The retrieval index: its file format, loading and validation, and the model check.

An index is a directory written atomically by ``msa.retrieval.build`` (temp dir, then rename)::

    meta.json               format, model source (and pinned registry version), dataset digest, split,
                            counts, dims, ANN indexes, creation time and a probe that pins the model
                            (written last)
    image_emb.npy           [N, D] float16, L2-normalised global image embeddings v
    text_emb.npy            [M, D] float16, L2-normalised caption [CLS]
    caption_image.npy       [M] int64, the image index of each caption
    image_scales_<k>.npy    [N, C_k] float16, the pooled stage vectors s_k (k = 0..K-1) MSCMAT needs
    image_keys.json         [N] shard sample keys
    captions.json           [M] caption strings
    image_emb.ivf           optional faiss IVF index over image_emb (text queries), see backends.py
    text_emb.ivf            optional faiss IVF index over text_emb (image queries)

Vectors are float16 on disk and memory-mapped when loaded (``np.load(mmap_mode="r")``): loading reads
headers, not data, so it costs the same for a thousand images or a million, and searching touches only
what it reads (one pass over the global embeddings for exact search; the probed lists of an ANN index;
the top-R candidates' scale rows for MSCMAT re-ranking). A million images of the paper preset
(D=1024, scales 256+512+1024+2048) are about 9.7 GB of float16, which need not fit in RAM or on the
device. Format version 1 (float32, read whole) is refused with a message to rebuild.

Caption token states are recomputed from the text (cheap), so only the image side's scale vectors
are stored. The probe in meta.json (embeddings of a fixed caption and a fixed image) lets
``check_model`` refuse to search an index with any model other than the one it was built with.
"""

from __future__ import annotations

import json
import mmap
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from msa.retrieval.backends import load_ivf
from msa.runtime.resolver import ResolvedModel

INDEX_FORMAT = "msa-retrieval-index"
INDEX_FORMAT_VERSION = 2
VECTOR_DTYPE = np.float16
META_FILE = "meta.json"
IMAGE_EMB_FILE = "image_emb.npy"
TEXT_EMB_FILE = "text_emb.npy"
CAPTION_IMAGE_FILE = "caption_image.npy"
IMAGE_KEYS_FILE = "image_keys.json"
CAPTIONS_FILE = "captions.json"
# The searchable sides: "image" (image_emb, answers text queries), "text" (text_emb, answers image queries).
SIDES = ("image", "text")
ANN_FILES = {"image": "image_emb.ivf", "text": "text_emb.ivf"}
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
    """A loaded index: float16 memmaps on the host; search reads from them, moving only what it needs."""

    path: Path
    meta: dict[str, Any]
    image_emb: np.ndarray  # [N, D] float16 memmap
    text_emb: np.ndarray  # [M, D] float16 memmap
    caption_image: np.ndarray  # [M] int64 memmap
    image_scales: list[np.ndarray]  # K x [N, C_k] float16 memmaps
    image_keys: list[str]
    captions: list[str]
    _device_cache: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _ann_cache: dict[str, Any] = field(default_factory=dict, repr=False)
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

    def vectors(self, side: str) -> np.ndarray:
        """The global embeddings of ``side``: "image" (searched by text queries) or "text" (by image queries)."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        return self.image_emb if side == "image" else self.text_emb

    def vector_file(self, side: str) -> Path:
        return self.path / (IMAGE_EMB_FILE if side == "image" else TEXT_EMB_FILE)

    def ann_info(self, side: str) -> dict[str, Any] | None:
        """What meta.json records about ``side``'s ANN index, or None when it has none."""
        return (self.meta.get("ann") or {}).get(side)

    def ann(self, side: str):
        """``side``'s faiss IVF index (memory-mapped, loaded once), or None when the index has none."""
        info = self.ann_info(side)
        if info is None:
            return None
        if side not in self._ann_cache:
            try:
                self._ann_cache[side] = load_ivf(self.path / info["file"], *self.vectors(side).shape)
            except ValueError as e:
                raise IndexFormatError(str(e)) from e
        return self._ann_cache[side]

    def scale_rows(self, rows: torch.Tensor | Sequence[int], device: torch.device | str) -> list[torch.Tensor]:
        """The K scale vectors of images ``rows`` as float32 on ``device``: only those rows are read."""
        order = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows, dtype=np.int64)
        out = []
        for k, scales in enumerate(self.image_scales):
            block = torch.from_numpy(np.asarray(scales[order], dtype=np.float32))
            if not torch.isfinite(block).all():
                raise IndexFormatError(f"{self.path / scale_file(k)}: NaN or infinite values in rows "
                                       f"{order.tolist()}; rebuild the index")
            out.append(block.to(device))
        return out

    def tensors(self, device: torch.device | str) -> dict[str, Any]:
        """The whole index as float32 tensors on ``device`` (cached), for measuring small splits
        (``mscmat_matrix``, bench/rerank.py); search never calls it."""
        key = str(torch.device(device))
        if key not in self._device_cache:
            def upcast(array: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(device)

            self._device_cache[key] = {
                "image_emb": upcast(self.image_emb),
                "text_emb": upcast(self.text_emb),
                "caption_image": torch.from_numpy(np.array(self.caption_image)).to(device),
                "scales": [upcast(s) for s in self.image_scales],
            }
        return self._device_cache[key]

    def images_of(self, caption_index: int) -> str:
        return self.image_keys[int(self.caption_image[caption_index])]

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Index:
        """Map and validate an index; every problem raises ``IndexFormatError`` naming the file.

        Shapes and dtypes are checked from the .npy headers (values were checked when written; NaN in
        a searched row is reported by the search that meets it)."""
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
                f"{INDEX_FORMAT_VERSION} (float16 vectors, memory-mapped); rebuild the index {path} with `msa index`"
            )
        try:
            n, m = int(meta["counts"]["images"]), int(meta["counts"]["captions"])
            d, scale_dims = int(meta["dims"]["embed"]), [int(c) for c in meta["dims"]["scales"]]
            ann = {side: (meta.get("ann") or {}).get(side) for side in SIDES}
            ann_files = {side: path / info["file"] for side, info in ann.items() if info is not None}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise IndexFormatError(f"{path / META_FILE}: missing or invalid field {e}") from e

        image_emb = _read_array(path / IMAGE_EMB_FILE, (n, d), VECTOR_DTYPE)
        text_emb = _read_array(path / TEXT_EMB_FILE, (m, d), VECTOR_DTYPE)
        caption_image = _read_array(path / CAPTION_IMAGE_FILE, (m,), np.int64)
        if m and (caption_image.min() < 0 or caption_image.max() >= n):
            raise IndexFormatError(f"{path / CAPTION_IMAGE_FILE}: image indices outside [0, {n})")
        scales = [_read_array(path / scale_file(k), (n, c), VECTOR_DTYPE, random_access=True)
                  for k, c in enumerate(scale_dims)]
        for file in ann_files.values():
            if not file.is_file():
                raise IndexFormatError(f"{file}: missing (meta.json lists this ANN index; rebuild with `msa index`)")
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


def _read_array(path: Path, shape: tuple[int, ...], dtype, random_access: bool = False) -> np.ndarray:
    """``path`` memory-mapped read-only, after checking its header against meta.json's shape and dtype.

    ``random_access`` turns the kernel's read-ahead off (scale rows are read a few at a time, anywhere:
    read-ahead would read, and map, 32 pages around each)."""
    if not path.is_file():
        raise IndexFormatError(f"{path}: missing (the index is incomplete; rebuild it with `msa index`)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise IndexFormatError(f"{path}: unreadable, truncated or corrupt .npy ({e})") from e
    if array.shape != shape or array.dtype != dtype:
        raise IndexFormatError(
            f"{path}: shape {array.shape} dtype {array.dtype}, expected {shape} {np.dtype(dtype)} from meta.json"
        )
    handle = getattr(array, "_mmap", None)  # numpy's own mmap object; absent for empty arrays
    if random_access and handle is not None:
        handle.madvise(mmap.MADV_RANDOM)
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
