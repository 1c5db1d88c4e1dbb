"""Retrieval over a prebuilt index: embed a shard split once, then answer text or image queries.

The index is a directory written atomically by ``build_index`` (temp dir, then rename)::

    meta.json               format, model source (and pinned registry version), dataset digest, split,
                            counts, dims, creation time and a probe that pins the model (written last)
    image_emb.npy           [N, D] float32, L2-normalised global image embeddings v
    text_emb.npy            [M, D] float32, L2-normalised caption [CLS]
    caption_image.npy       [M] int64, the image index of each caption
    image_scales_<k>.npy    [N, C_k] float32, the pooled stage vectors s_k (k = 0..K-1) MSCMAT needs
    image_keys.json         [N] shard sample keys
    captions.json           [M] caption strings

Ranking is by cosine of the global embeddings (spec section 5), computed and top-k'd on the model's
device. With ``rerank=R`` the top ``max(R, k)`` candidates by cosine are re-scored with MSCMAT, the
mean over the K scales of its (0, 1) pair scores, and re-sorted (spec section 2, last paragraph).
How the two combine is ``rerank_mode``:

- ``"blend"`` (default): score = cosine + ``rerank_weight`` * mean_k S_k. Keeps the global ranking's
  evidence and lets MSCMAT break near-ties; ``rerank_weight`` defaults to 1.0.
- ``"mscmat"``: score = mean_k S_k alone, cosine only chooses the candidates.

Why blend: on the synthetic benchmark (bench/rerank.py, small preset, 600 held-out test images) pure
MSCMAT re-ranking changed mR by +0.0 (top 10) / +1.2 (top 20), the blend by +0.3 / +1.1, the latter the
only change whose 95% bootstrap interval excluded zero; the blend never fell below cosine where pure
MSCMAT sometimes did. Blend weights 1..8 scored within 0.4 mR of each other on validation. Gains come
from image->text (MSCMAT's alignment loss trains that direction only). Re-ranking is off by default
(``rerank=0``), as in the reference.

Caption token states are recomputed from the text (cheap), so only the image side's scale vectors
are stored. bench/rerank.py measures whether re-ranking helps (``reranked_recall`` keeps the exact
``msa.metrics.recall_at_k`` protocol).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import weakref
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from msa.config import MSAConfig
from msa.data import ImageTransform, iterate_samples
from msa.evaluate import chunked
from msa.encoders import build_tokenizer, tokenize
from msa.metrics import recall_at_k
from msa.model import MSAModel

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

RerankMode = Literal["blend", "mscmat"]
RERANK_MODES: tuple[str, ...] = ("blend", "mscmat")
DEFAULT_RERANK_MODE: RerankMode = "blend"
DEFAULT_RERANK_WEIGHT = 1.0

_MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def scale_file(k: int) -> str:
    return f"image_scales_{k}.npy"


class IndexFormatError(ValueError):
    """An index directory is missing, incomplete or corrupt; the message names the file."""


class ModelIndexMismatch(ValueError):
    """The model searching an index is not the model (or the architecture) the index was built with."""


# ------------------------------------------------------------------------------------------ model


@dataclass
class RetrievalModel:
    """A model ready to embed queries: network (eval mode, on ``device``), config, tokenizer, transform."""

    model: MSAModel
    cfg: MSAConfig
    tokenizer: Any
    device: torch.device
    source: str  # as given
    resolved: str  # pinned: absolute checkpoint dir, or models:/<name>/<version>
    registry: dict[str, Any] | None = None  # name, version, alias, run_id when from the MLflow registry
    checkpoint_epoch: int | None = None
    trained_on: str | None = None  # dataset digest stored in the checkpoint
    transform: ImageTransform = field(init=False)

    def __post_init__(self) -> None:
        self.transform = ImageTransform(self.cfg.image.size)

    @property
    def embed_dim(self) -> int:
        return self.model.text.hidden_size

    @property
    def scale_dims(self) -> tuple[int, ...]:
        return tuple(self.model.image.stage_dims)

    @torch.no_grad()
    def encode_texts(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(cls [B, D] L2-normalised, tokens [B, L-1, D], MSCMAT key padding mask or None)."""
        ids, mask = tokenize(self.tokenizer, list(captions), self.cfg.text.max_tokens)
        ids, mask = ids.to(self.device), mask.to(self.device)
        cls, tokens = self.model.encode_text(ids, mask)
        padding = (mask[:, 1 : 1 + tokens.shape[1]] == 0) if self.model.use_padding_mask else None
        return cls.float(), tokens, padding

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        v, scales = self.model.encode_image(pixels.to(self.device))
        return v.float(), [s.float() for s in scales]

    @torch.no_grad()
    def mscmat_mean(
        self,
        scale_feats: Sequence[torch.Tensor],
        tokens: torch.Tensor,
        cls: torch.Tensor,
        padding: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mean over the K scales of MSCMAT's scores, [B_img, B_cap], exactly as ``MSAModel.forward``."""
        return self.model.mscmat(list(scale_feats), tokens, cls, key_padding_mask=padding).float().mean(0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_mlflow_uri(source: str) -> bool:
    return str(source).startswith(_MLFLOW_SCHEMES)


def load_model(model_source: str | os.PathLike[str], device: str | torch.device | None = None) -> RetrievalModel:
    """A checkpoint directory (holding checkpoint.pt) or an MLflow model URI -> ``RetrievalModel``.

    MLflow URIs: ``models:/msa-retrieval/3``, ``models:/msa-retrieval@champion``,
    ``models:/msa-retrieval/latest`` (registry; the version is resolved and pinned) or any other URI
    ``mlflow.artifacts.download_artifacts`` accepts (``models:/m-<id>``, ``runs:/<run>/model``). The
    tracking store is MLFLOW_TRACKING_URI, else the project's default (.msa/mlflow.db).
    """
    from msa.train import load_checkpoint, model_from_checkpoint

    source = str(model_source)
    device = torch.device(device) if device is not None else default_device()
    registry = None
    if is_mlflow_uri(source):
        with tempfile.TemporaryDirectory(prefix="msa-model-") as tmp:
            checkpoint_dir, tokenizer_dir, resolved, registry = _download_mlflow_model(source, Path(tmp))
            state = load_checkpoint(checkpoint_dir, map_location="cpu")
            model, cfg = model_from_checkpoint(state)
            tokenizer = build_tokenizer(str(tokenizer_dir))
    else:
        directory = Path(source).expanduser()
        if directory.is_file() and directory.name.endswith(".pt"):
            directory = directory.parent
        if not directory.is_dir():
            raise FileNotFoundError(
                f"model source {source!r}: no such checkpoint directory (expected a directory holding "
                f"checkpoint.pt, or an MLflow URI such as models:/msa-retrieval@champion)"
            )
        resolved = str(directory.resolve())
        state = load_checkpoint(directory, map_location="cpu")
        model, cfg = model_from_checkpoint(state)
        tokenizer = build_tokenizer(cfg.text.tokenizer or cfg.text.model)
    model.to(device).eval()
    return RetrievalModel(
        model=model,
        cfg=cfg,
        tokenizer=tokenizer,
        device=device,
        source=source,
        resolved=resolved,
        registry=registry,
        checkpoint_epoch=state.get("epoch"),
        trained_on=state.get("dataset_digest"),
    )


def _parse_registry_uri(uri: str) -> tuple[str, str | None, str | None] | None:
    """models:/name/3 -> (name, "3", None); models:/name@alias -> (name, None, alias); else None."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/([^/]+)|@([^/]+))/?", uri)
    if not match:
        return None
    return match[1], match[2], match[3]


def _download_mlflow_model(uri: str, into: Path) -> tuple[Path, Path, str, dict[str, Any] | None]:
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from msa.serving import CHECKPOINT_ARTIFACT, TOKENIZER_ARTIFACT
    from msa.tracking import default_tracking_uri

    tracking_uri = default_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    registry, pinned = None, uri
    parsed = _parse_registry_uri(uri)
    try:
        if parsed is not None:
            name, version, alias = parsed
            client = MlflowClient()
            if alias is not None:
                mv = client.get_model_version_by_alias(name, alias)
            elif version == "latest":
                versions = client.search_model_versions(f"name='{name}'")
                if not versions:
                    raise MlflowException(f"registered model {name!r} has no versions")
                mv = max(versions, key=lambda v: int(v.version))
            else:
                mv = client.get_model_version(name, version)
            registry = {"name": name, "version": str(mv.version), "alias": alias, "run_id": mv.run_id}
            pinned = f"models:/{name}/{mv.version}"
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=pinned, dst_path=str(into)))
    except MlflowException as e:
        raise FileNotFoundError(f"MLflow model {uri!r} (tracking store {tracking_uri}): {e.message}") from e

    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        raise FileNotFoundError(f"MLflow model {uri!r}: downloaded to {local} but it has no MLmodel file")
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    artifacts = flavor.get("artifacts") or {}

    def artifact(name: str) -> Path:
        path = local / artifacts.get(name, {}).get("path", f"artifacts/{name}")
        if not path.exists():
            raise FileNotFoundError(
                f"MLflow model {uri!r} lacks its {name!r} artifact ({path}); is it an msa.serving model?"
            )
        return path

    return artifact(CHECKPOINT_ARTIFACT), artifact(TOKENIZER_ARTIFACT), pinned, registry


def _probe_pixels(size: int) -> torch.Tensor:
    """A fixed, non-trivial normalised-range image [1, 3, size, size] used to fingerprint the image tower."""
    ramp = torch.linspace(-2.0, 2.0, size)
    return torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        (ramp[None, :] * ramp[:, None]).clamp(-2, 2)])[None]


@torch.no_grad()
def model_probe(model: RetrievalModel) -> dict[str, Any]:
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


@torch.no_grad()
def embed_for_index(model: RetrievalModel, urls: list[str], batch_size: int = 128) -> dict[str, Any]:
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
    model_source: str | os.PathLike[str] | RetrievalModel,
    data_uri: str,
    out_dir: str | os.PathLike[str],
    split: str = "test",
    batch_size: int = 128,
    storage_options: dict | None = None,
) -> Path:
    """Embed ``split`` of the shard set at ``data_uri`` once and write the index to ``out_dir`` atomically.

    ``out_dir`` is replaced if it already holds an index; any other non-empty directory is refused.
    Returns the index path.
    """
    from shards.manifest import read_manifest
    from shards.storage import register_webdataset_s3

    started = time.perf_counter()
    out = Path(out_dir).expanduser().absolute()
    _check_replaceable(out)
    model = model_source if isinstance(model_source, RetrievalModel) else load_model(model_source)
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
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
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


# ----------------------------------------------------------------------------------------- search


@dataclass
class Hit:
    rank: int  # 1-based
    score: float  # what the list is sorted by: cosine, or the re-rank score for re-ranked hits
    image_key: str
    image_index: int
    cosine: float
    mscmat: float | None = None  # mean over scales of MSCMAT's scores, when re-ranked
    caption: str | None = None  # image queries: the retrieved caption
    caption_index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_model(index: Index, model: RetrievalModel) -> None:
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


def combine_scores(
    cosine: torch.Tensor, mscmat: torch.Tensor, mode: str = DEFAULT_RERANK_MODE, weight: float = DEFAULT_RERANK_WEIGHT
) -> torch.Tensor:
    """The re-rank score of candidates: ``mscmat`` alone, or ``cosine + weight * mscmat`` ("blend")."""
    if mode == "mscmat":
        return mscmat
    if mode == "blend":
        return cosine + weight * mscmat
    raise ValueError(f"rerank_mode must be one of {RERANK_MODES}, got {mode!r}")


def _validate(k: int, rerank: int, mode: str) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if rerank < 0:
        raise ValueError(f"rerank must be >= 0, got {rerank}")
    if mode not in RERANK_MODES:
        raise ValueError(f"rerank_mode must be one of {RERANK_MODES}, got {mode!r}")


def _ranked(
    cosine: torch.Tensor, k: int, rerank: int, rescore, mode: str, weight: float
) -> list[tuple[int, float, float, float | None]]:
    """(candidate index, score, cosine, mscmat) for the top k; rescore(indices) -> MSCMAT means."""
    n = cosine.shape[0]
    k = min(k, n)
    window = min(max(rerank, k), n) if rerank else k
    top_cos, top_idx = torch.topk(cosine, window)
    if not rerank:
        return [(int(i), float(c), float(c), None) for i, c in zip(top_idx.tolist(), top_cos.tolist())]
    mscmat = rescore(top_idx)
    scores = combine_scores(top_cos, mscmat, mode, weight)
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return [
        (int(top_idx[o]), float(scores[o]), float(top_cos[o]), float(mscmat[o])) for o in order.tolist()
    ]


@torch.no_grad()
def search_text(
    index: Index,
    model: RetrievalModel,
    query: str,
    k: int = 10,
    rerank: int = 0,
    *,
    rerank_mode: str = DEFAULT_RERANK_MODE,
    rerank_weight: float = DEFAULT_RERANK_WEIGHT,
) -> list[Hit]:
    """Images for a caption: top ``k`` by cosine; ``rerank=R`` re-scores the top max(R, k) with MSCMAT."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("the text query is empty")
    _validate(k, rerank, rerank_mode)
    check_model(index, model)
    t = index.tensors(model.device)
    cls, tokens, padding = model.encode_texts([query])
    cosine = t["image_emb"] @ cls[0]

    def rescore(idx: torch.Tensor) -> torch.Tensor:
        return model.mscmat_mean([s[idx] for s in t["scales"]], tokens, cls, padding)[:, 0]

    ranked = _ranked(cosine, k, rerank, rescore, rerank_mode, rerank_weight)
    return [
        Hit(rank=r, score=s, image_key=index.image_keys[i], image_index=i, cosine=c, mscmat=ms)
        for r, (i, s, c, ms) in enumerate(ranked, start=1)
    ]


def _load_image(image) -> "Image.Image":  # noqa: F821
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    path = Path(image).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        loaded = Image.open(path)
        loaded.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    return loaded


@torch.no_grad()
def search_image(
    index: Index,
    model: RetrievalModel,
    image,
    k: int = 10,
    rerank: int = 0,
    *,
    rerank_mode: str = DEFAULT_RERANK_MODE,
    rerank_weight: float = DEFAULT_RERANK_WEIGHT,
) -> list[Hit]:
    """Captions for an image (path, bytes or PIL image); each hit names the caption's own image key."""
    _validate(k, rerank, rerank_mode)
    check_model(index, model)
    pixels = model.transform(_load_image(image))[None]
    t = index.tensors(model.device)
    v, feats = model.encode_images(pixels)
    cosine = t["text_emb"] @ v[0]

    def rescore(idx: torch.Tensor) -> torch.Tensor:
        cls, tokens, padding = model.encode_texts([index.captions[i] for i in idx.tolist()])
        return model.mscmat_mean(feats, tokens, cls, padding)[0]

    ranked = _ranked(cosine, k, rerank, rescore, rerank_mode, rerank_weight)
    hits = []
    for r, (j, s, c, ms) in enumerate(ranked, start=1):
        i = int(index.caption_image[j])
        hits.append(Hit(rank=r, score=s, image_key=index.image_keys[i], image_index=i, cosine=c, mscmat=ms,
                        caption=index.captions[j], caption_index=j))
    return hits


# ------------------------------------------------------------------------- whole-split measurement


@torch.no_grad()
def mscmat_matrix(index: Index, model: RetrievalModel, caption_batch: int = 64) -> torch.Tensor:
    """[N_images, N_captions] mean-over-scales MSCMAT scores of every pair of the index (on the device)."""
    check_model(index, model)
    t = index.tensors(model.device)
    columns = []
    for start in range(0, index.num_captions, caption_batch):
        cls, tokens, padding = model.encode_texts(index.captions[start : start + caption_batch])
        columns.append(model.mscmat_mean(t["scales"], tokens, cls, padding))
    return torch.cat(columns, dim=1)


def rerank_similarities(sims: torch.Tensor, rescored: torch.Tensor, top: int, dim: int) -> torch.Tensor:
    """A float64 similarity matrix whose per-query top-``top`` entries (by ``sims``, ties included) carry
    ``rescored``.

    Queries run along ``dim``'s complement: dim=1 ranks captions per image row (image->text), dim=0
    images per caption column (text->image). The re-scored entries are lifted above every other entry
    of the matrix, so each query's candidates come first in re-rank order and the rest keep their cosine
    order; ``msa.metrics.recall_at_k`` on it is the recall of the re-ranked lists.
    """
    if sims.shape != rescored.shape:
        raise ValueError(f"sims {tuple(sims.shape)} and rescored {tuple(rescored.shape)} differ")
    base, new = sims.double(), rescored.double().to(sims.device)
    top = min(int(top), base.shape[dim])
    # Tie-inclusive: everything scoring at least the top-th value, so exact ties (duplicate captions)
    # never split across the boundary and the identity re-rank reproduces recall_at_k exactly.
    kth = base.topk(top, dim=dim).values.narrow(dim, top - 1, 1)
    chosen = base >= kth
    lift = (base.max() - new[chosen].min()).clamp(min=0) + 1.0
    return torch.where(chosen, new + lift, base)


def reranked_recall(
    sims: torch.Tensor,
    rescored: torch.Tensor,
    caption_image: torch.Tensor | np.ndarray | Sequence[int],
    top: int,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """``recall_at_k`` of the lists re-ranked within each query's top ``top``: i2t from image rows
    re-ranked over captions, t2i from caption columns re-ranked over images, mR their mean."""
    i2t = recall_at_k(rerank_similarities(sims, rescored, top, dim=1), caption_image, ks)
    t2i = recall_at_k(rerank_similarities(sims, rescored, top, dim=0), caption_image, ks)
    out = {f"i2t_R{k}": i2t[f"i2t_R{k}"] for k in ks} | {f"t2i_R{k}": t2i[f"t2i_R{k}"] for k in ks}
    out["mR"] = sum(out.values()) / len(out)
    return out
