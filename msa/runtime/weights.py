"""Pretrained weights staged once for machines without a hub: ``fetch`` writes them, ``materialize_weights`` reads them.

The project runs offline (``msa.paths.OFFLINE_ENV``): towers load weights from a local path, a pip package or
a warm hub cache. ``fetch`` runs where the hub is reachable and writes a preset's hub weights into a bundle,
a local directory or ``s3://`` prefix:

- ``image.safetensors``: the timm backbone's full state dict (``create_model(pretrained=True)``), which
  ``image.weights=PATH`` loads strictly;
- ``text/``: the transformers model and its tokenizer (``save_pretrained``), a directory ``text.model`` takes;
- ``clip.<ext>``: for CLIP presets, a copy of the open_clip state-dict file given (RemoteCLIP, GeoRSCLIP):
  no hub serves those under open_clip names;
- ``weights.json``, written last and atomically: every file's sha256 and size, the config overrides that
  use the bundle, the sources and the package versions. A bundle without it is incomplete.

Training on a cluster points the overrides at an ``s3://`` bundle; ``materialize_weights`` (called where
the runtime turns a config into a model: the Ray train loop and ``resolver``) copies each remote weights
field once per node into ``MSA_HOME/weights/``, checks every file against ``weights.json`` and hands the
model library a config of local paths, so the library itself never sees S3.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from msa.config import MSAConfig, parse_overrides, resolve_config
from msa.paths import LOCAL_STATE
from msa.pretrained import WeightsUnavailableError
from shards.storage import Store, is_remote

__all__ = ["MANIFEST", "WEIGHT_FIELDS", "NothingToFetchError", "WeightsBundle", "fetch", "materialize_weights"]

MANIFEST = "weights.json"
FORMAT = 1
IMAGE_FILE = "image.safetensors"
TEXT_DIR = "text"
# Config fields that may name weights files or directories, hence a bundle's s3:// URIs.
WEIGHT_FIELDS = ("image.weights", "text.model", "text.tokenizer", "clip.checkpoint")
_VERSIONED = ("torch", "timm", "transformers", "huggingface_hub", "safetensors", "open_clip_torch")
_CHUNK = 1 << 20


class NothingToFetchError(ValueError):
    """The preset takes no weights from a hub (or CLIP weights were not given as a file)."""


@dataclass(frozen=True)
class WeightsBundle:
    """What ``fetch`` wrote: where, the overrides that use it, and each file's sha256 and size."""

    uri: str
    preset: str
    overrides: dict[str, str]
    files: dict[str, dict[str, Any]]
    sources: dict[str, dict[str, Any]]

    def override_args(self) -> list[str]:
        """``["image.weights=...", ...]``: what ``--set`` (or ``resolve_config``'s overrides) takes."""
        return [f"{key}={value}" for key, value in self.overrides.items()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------- fetch


def _text_from_hub(cfg: MSAConfig) -> bool:
    model = cfg.text.model
    local = model.startswith(("packaged:", "open_clip:")) or is_remote(model) or Path(model).expanduser().exists()
    return cfg.text.weights == "pretrained" and not local


def _plan(cfg: MSAConfig, preset: str, clip_checkpoint: str | None) -> list[str]:
    """The towers to fetch ("image", "text", "clip"); NothingToFetchError when there are none."""
    if cfg.clip.enabled:
        if clip_checkpoint is None:
            raise NothingToFetchError(
                f"preset {preset!r} has open_clip towers ({cfg.clip.arch or 'clip.model_cfg'}): their weights come "
                f"from an open_clip state-dict file such as RemoteCLIP's or GeoRSCLIP's, not from a hub; pass it as "
                f"--clip-checkpoint FILE (python: clip_checkpoint=) to copy it into the bundle as clip.checkpoint"
            )
        if not Path(clip_checkpoint).is_file():
            raise FileNotFoundError(f"--clip-checkpoint {clip_checkpoint}: no such file")
        return ["clip"]
    if clip_checkpoint is not None:
        raise ValueError(f"--clip-checkpoint applies to CLIP presets (clip.arch set), not to preset {preset!r}")
    towers = (["image"] if cfg.image.weights == "hub" else []) + (["text"] if _text_from_hub(cfg) else [])
    if not towers:
        raise NothingToFetchError(
            f"preset {preset!r}: nothing to fetch: no tower takes its weights from a hub (image.weights="
            f"{cfg.image.weights!r}, text.model={cfg.text.model!r} with text.weights={cfg.text.weights!r}); hub "
            f"weights are image.weights=hub and text.weights=pretrained with a hub model name"
        )
    return towers


@contextlib.contextmanager
def _hub(from_cache: bool) -> Iterator[None]:
    """The hub reachable for the block (or, ``from_cache``, only this machine's hub cache).

    huggingface_hub reads HF_HUB_OFFLINE once, at import, into ``constants.HF_HUB_OFFLINE``, and every hub
    call (timm's and transformers' go through it) consults that attribute; so it is set there and restored,
    the process environment stays offline.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = from_cache
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _cached_revision(repo_id: str, filenames: Sequence[str], hub_cache: str | None) -> str | None:
    """The hub commit whose files were just used: the snapshot folder the hub cache resolved them into."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache)
        if isinstance(found, str):
            return Path(found).parent.name
    return None


def _download_image(cfg: MSAConfig, into: Path, hub_cache: str | None) -> dict[str, Any]:
    import safetensors.torch
    import timm

    name = cfg.image.backbone
    model = timm.create_model(name, pretrained=True, cache_dir=hub_cache)
    # Clones: safetensors refuses tensors that share storage.
    state = {key: tensor.detach().clone().contiguous() for key, tensor in model.state_dict().items()}
    safetensors.torch.save_file(state, str(into / IMAGE_FILE))
    pretrained = dict(getattr(model, "pretrained_cfg", None) or {})
    repo = pretrained.get("hf_hub_id")
    if not repo:  # weights timm takes from a URL (torch hub cache), not from the hub
        return {"library": "timm", "model": name, "tag": pretrained.get("tag"), "url": pretrained.get("url")}
    return {"library": "timm", "model": name, "tag": pretrained.get("tag"), "hf_hub_id": repo,
            "revision": _cached_revision(repo, ("model.safetensors", "pytorch_model.bin"), hub_cache)}


def _download_text(cfg: MSAConfig, into: Path, hub_cache: str | None) -> dict[str, Any]:
    from transformers import AutoModel, AutoTokenizer

    name, tokenizer = cfg.text.model, cfg.text.tokenizer or cfg.text.model
    model = AutoModel.from_pretrained(name, cache_dir=hub_cache)
    model.save_pretrained(into / TEXT_DIR)
    AutoTokenizer.from_pretrained(tokenizer, cache_dir=hub_cache).save_pretrained(into / TEXT_DIR)
    return {"library": "transformers", "model": name, "revision": _cached_revision(name, ("config.json",), hub_cache),
            "tokenizer": tokenizer}


def _download(cfg: MSAConfig, towers: list[str], into: Path, *, clip_checkpoint: str | None,
              hub_cache: str | None, from_cache: bool) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Write the towers' files under ``into``; returns (config overrides by bundle-relative name, sources)."""
    overrides: dict[str, str] = {}
    sources: dict[str, dict[str, Any]] = {}
    if "clip" in towers:
        name = "clip" + (Path(clip_checkpoint).suffix or ".pt")
        shutil.copyfile(clip_checkpoint, into / name)
        overrides["clip.checkpoint"] = name
        sources["clip"] = {"library": "open_clip", "arch": cfg.clip.arch, "file": str(Path(clip_checkpoint).resolve())}
    with _hub(from_cache):
        for tower, download, what in (("image", _download_image, f"image backbone {cfg.image.backbone!r} (timm)"),
                                      ("text", _download_text, f"text model {cfg.text.model!r} (transformers)")):
            if tower not in towers:
                continue
            try:
                sources[tower] = download(cfg, into, hub_cache)
            except (OSError, RuntimeError, ValueError) as e:  # hub errors are OSErrors; timm raises RuntimeError
                where = "this machine's hub cache" if from_cache else "the hub"
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise WeightsUnavailableError(f"cannot get the weights of {what} from {where}: {first}") from e
    if "image" in towers:
        overrides["image.weights"] = IMAGE_FILE
    if "text" in towers:
        overrides["text.model"] = TEXT_DIR
        if cfg.text.tokenizer is not None:
            overrides["text.tokenizer"] = TEXT_DIR
    return overrides, sources


def _publish(store: Store, local: Path, name: str) -> dict[str, Any]:
    """Copy ``local`` to ``name`` in ``store`` atomically; its sha256 and size, hashed as written."""
    digest, size = hashlib.sha256(), 0
    with open(local, "rb") as src, store.atomic_writer(name) as dst:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            dst.write(chunk)
    return {"sha256": digest.hexdigest(), "size": size}


def _versions() -> dict[str, str]:
    out = {}
    for dist in _VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def fetch(
    preset: str,
    dest: str,
    storage_options: dict | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    clip_checkpoint: str | None = None,
    hub_cache: str | None = None,
    from_cache: bool = False,
) -> WeightsBundle:
    """Download ``preset``'s hub weights (with ``overrides`` applied) once and write them as a bundle at ``dest``.

    ``dest``: a local directory or ``s3://bucket/prefix``. The hub is reachable for this call only, whatever
    HF_HUB_OFFLINE says; ``from_cache`` reads this machine's hub cache instead (no network: e.g. a warm cache
    on a workstation staged for a cluster). ``hub_cache``: the hub cache directory (default huggingface_hub's).
    ``clip_checkpoint``: for CLIP presets, the open_clip state-dict file to copy. Raises NothingToFetchError when
    the preset takes nothing from a hub, WeightsUnavailableError when the hub (or cache) lacks the weights,
    StorageError when ``dest`` cannot be written. ``weights.json`` is removed first and written last.
    """
    given = parse_overrides(list(overrides) if not isinstance(overrides, Mapping) else overrides)
    cfg = resolve_config(preset, given)
    towers = _plan(cfg, preset, clip_checkpoint)
    store = Store(dest, storage_options)
    with tempfile.TemporaryDirectory(prefix="msa-weights-") as tmp:
        staged = Path(tmp)
        names, sources = _download(cfg, towers, staged, clip_checkpoint=clip_checkpoint, hub_cache=hub_cache,
                                   from_cache=from_cache)
        store.remove(MANIFEST)  # the bundle is incomplete until the new manifest is written
        files = {path.relative_to(staged).as_posix(): _publish(store, path, path.relative_to(staged).as_posix())
                 for path in sorted(staged.rglob("*")) if path.is_file()}
    bundle = WeightsBundle(uri=store.uri, preset=preset, overrides={k: store.url(v) for k, v in names.items()},
                           files=files, sources=sources)
    manifest = {"format": FORMAT, "preset": preset, "config_overrides": given, "overrides": bundle.overrides,
                "files": files, "sources": sources, "versions": _versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return bundle


# ----------------------------------------------------------------------------------- materialize


def _manifest_entries(uri: str, storage_options: dict | None) -> tuple[Store, str, dict[str, dict[str, Any]]]:
    """(the bundle's store, ``uri``'s name in it, weights.json's entries for that name: the file or the folder)."""
    root, _, name = uri.rstrip("/").rpartition("/")
    store = Store(root, storage_options)
    where = store.url(MANIFEST)
    raw = store.read_bytes(MANIFEST)
    if raw is None:
        raise WeightsUnavailableError(f"{uri}: no {MANIFEST} at {where}: remote weights must be a complete bundle "
                                      f"written by `msa weights fetch`")
    try:
        files = json.loads(raw)["files"]
        entries = {rel: {"sha256": str(e["sha256"]), "size": int(e["size"])} for rel, e in files.items()
                   if rel == name or rel.startswith(name + "/")}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsUnavailableError(f"{where}: not a weights manifest ({type(e).__name__}: {e})") from None
    if not entries:
        raise WeightsUnavailableError(f"{uri}: {where} lists no file {name!r} (listed: {', '.join(sorted(files))})")
    return store, name, entries


def _copy_checked(store: Store, rel: str, into: Path, expected: dict[str, Any]) -> None:
    """Download ``rel`` of the bundle to ``into`` (retried while the endpoint fails, shards.storage), refusing
    it unless its size and sha256 are weights.json's."""
    url = store.url(rel)
    into.parent.mkdir(parents=True, exist_ok=True)
    got = store.download(rel, into)
    if got is None:
        raise WeightsUnavailableError(f"{url}: listed in {MANIFEST} but absent; fetch the weights again "
                                      "(msa weights fetch)")
    digest, size = got
    if (digest, size) != (expected["sha256"], expected["size"]):
        raise WeightsUnavailableError(
            f"{url}: sha256 {digest[:16]}... and {size} bytes, but {MANIFEST} lists "
            f"{expected['sha256'][:16]}... and {expected['size']} bytes: the file is corrupt or was replaced "
            f"without its manifest; fetch the weights again (msa weights fetch)"
        )


@contextlib.contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """One process of this node at a time (the Ray workers of a node start together)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _local_copy(uri: str, storage_options: dict | None, cache: Path) -> str:
    """A local path holding ``uri``'s file or folder, downloaded and checked once per node and content."""
    store, name, entries = _manifest_entries(uri, storage_options)
    # Keyed by the URI and the manifest's entries: a bundle fetched again gets a folder of its own.
    key = hashlib.sha256(json.dumps([uri, entries], sort_keys=True).encode()).hexdigest()[:20]
    final = cache / key
    if not final.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        with _node_lock(cache / f".{key}.lock"):
            if not final.is_dir():  # another worker of this node may have finished it meanwhile
                tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp.", dir=cache))
                try:
                    for rel, expected in sorted(entries.items()):
                        _copy_checked(store, rel, tmp / rel, expected)
                    os.rename(tmp, final)  # complete folders only ever appear under their final name
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    return str(final / name)


def materialize_weights(
    cfg: MSAConfig,
    storage_options: dict | None = None,
    *,
    fields: Sequence[str] = WEIGHT_FIELDS,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MSAConfig:
    """``cfg`` with every remote (``s3://``) weights URI among ``fields`` replaced by a checked local copy.

    Each file is downloaded once per node into ``cache_dir`` (default ``MSA_HOME/weights``) and verified
    against its bundle's weights.json (WeightsUnavailableError naming the file otherwise); later calls reuse
    the copy without downloading. A config with no remote weights is returned as is.
    """
    cache = Path(cache_dir) if cache_dir is not None else LOCAL_STATE / "weights"
    data = cfg.to_dict()
    changed = False
    for dotted in fields:
        section, key = dotted.split(".", 1)
        value = data[section][key]
        if isinstance(value, str) and is_remote(value):
            data[section][key] = _local_copy(value, storage_options, cache)
            changed = True
    return MSAConfig.from_dict(data) if changed else cfg
