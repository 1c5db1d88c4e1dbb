"""The shard set manifest (``URI/manifest.json``, written last) and its verification.

Layout of a shard set::

    URI/manifest.json                   this manifest (schema_version 2)
    URI/sizes.json                      {"train/train-000000.tar": n_samples, ...} (open_clip style)
    URI/<split>/<split>-NNNNNN.tar ...  NNNNNN: where the shard's keys start in hash order
                                        (shards.assign); not consecutive, list them from here

The dataset ``digest`` is the sha256 of the schema version and the sorted (shard name, shard sha256)
pairs: it identifies the shard content. ``source_digest`` identifies the input (annotation bytes,
image bytes, options); a rerun with the same source digest finds the work already done. Each
shard's ``content`` key says what it holds, so a rerun on a changed input keeps (lists in
``reused_shards``) every shard whose content key is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import re

from pydantic import BaseModel, Field, PrivateAttr

from .storage import TMP_RE, StorageError, Store

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "SIZES_NAME",
    "ShardInfo",
    "SplitInfo",
    "Manifest",
    "VerifyReport",
    "read_manifest",
    "verify_shards",
    "dataset_digest",
    "shard_name",
    "SHARD_RE",
]

SCHEMA_VERSION = 2  # 2: shards assigned by key (shards.assign), content keys
MANIFEST_NAME = "manifest.json"
SIZES_NAME = "sizes.json"
# A shard of this layout: "<split>/<split>-NNNNNN.tar" (binary digits follow in splits of > 2^19 shards).
SHARD_RE = re.compile(r"^([A-Za-z0-9_-]+)/\1-\d{6}[01]*\.tar$")


def shard_name(split: str, label: str) -> str:
    return f"{split}/{split}-{label}.tar"


class ShardInfo(BaseModel):
    name: str  # relative to the set's URI, e.g. "train/train-000000.tar"
    bytes: int
    sha256: str
    samples: int
    content: str | None = None  # shards.shardfile.content_key of its members: equal keys, equal bytes


class SplitInfo(BaseModel):
    images: int
    captions: int
    shards: list[ShardInfo] = Field(default_factory=list)


class QuarantineEntry(BaseModel):
    source: str  # image filename, or "<annotation file> record N / line N"
    reason: str
    split: str | None = None
    key: str | None = None


class LeakSide(BaseModel):
    split: str
    filename: str
    key: str


class Leak(BaseModel):
    kind: str  # "exact" (same image bytes) or "ahash" (same 8x8 average hash)
    a: LeakSide
    b: LeakSide


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    corpus: str
    annotations: str  # annotation file name
    source_digest: str
    digest: str  # dataset digest (full sha256 hex)
    splits: dict[str, SplitInfo]
    options: dict
    quarantine: list[QuarantineEntry] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    leaks: list[Leak] | None = None  # None when the leak check was not run
    reused_shards: list[str] = Field(default_factory=list)  # kept from the previous write, not rewritten

    _base_uri: str | None = PrivateAttr(default=None)
    _reused: bool = PrivateAttr(default=False)

    @property
    def short_digest(self) -> str:
        """16-hex-digit display form of :attr:`digest`."""
        return self.digest[:16]

    @property
    def uri(self) -> str | None:
        """Where the set lives (set by :func:`read_manifest` and ``write_shards``)."""
        return self._base_uri

    @property
    def manifest_uri(self) -> str | None:
        return None if self._base_uri is None else Store.join(self._base_uri, MANIFEST_NAME)

    @property
    def reused(self) -> bool:
        """True when ``write_shards`` found this set already up to date and wrote nothing."""
        return self._reused

    @property
    def write_counts(self) -> tuple[int, int]:
        """(rewritten, reused) shards of the ``write_shards`` call that returned this manifest."""
        total = sum(len(s.shards) for s in self.splits.values())
        return (0, total) if self._reused else (total - len(self.reused_shards), len(self.reused_shards))

    def shards(self) -> list[ShardInfo]:
        return [s for split in sorted(self.splits) for s in self.splits[split].shards]

    def shard_urls(self, split: str) -> list[str]:
        """Absolute URIs (local paths or ``s3://...``) of ``split``'s shards, in order."""
        if self._base_uri is None:
            raise ValueError("manifest has no base URI; load it with read_manifest()")
        if split not in self.splits:
            raise KeyError(f"no split {split!r} in {self._base_uri} (have: {', '.join(sorted(self.splits))})")
        return [Store.join(self._base_uri, s.name) for s in self.splits[split].shards]

    def sizes(self) -> dict[str, int]:
        """open_clip-style sizes: shard name -> sample count."""
        return {s.name: s.samples for s in self.shards()}

    def to_json(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=1, sort_keys=True, ensure_ascii=False)
                + "\n").encode("utf-8")


class VerifyReport(BaseModel):
    uri: str
    ok: bool
    problems: list[str] = Field(default_factory=list)
    checked: int = 0
    missing: list[str] = Field(default_factory=list)
    corrupt: list[str] = Field(default_factory=list)
    extra: list[str] = Field(default_factory=list)
    digest: str | None = None


def dataset_digest(shards: list[ShardInfo], schema_version: int = SCHEMA_VERSION) -> str:
    payload = json.dumps({"schema_version": schema_version,
                          "shards": sorted([s.name, s.sha256] for s in shards)}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _load(store: Store) -> Manifest:
    raw = store.read_bytes(MANIFEST_NAME)
    if raw is None:
        raise FileNotFoundError(f"{store.url(MANIFEST_NAME)}: no manifest (not a shard set, or an unfinished write)")
    try:
        m = Manifest.model_validate_json(raw)
    except ValueError as exc:
        raise StorageError(f"{store.url(MANIFEST_NAME)}: unreadable manifest: {str(exc).splitlines()[0]}") from exc
    m._base_uri = store.uri
    return m


def read_manifest(uri: str, storage_options: dict | None = None) -> Manifest:
    """Load ``URI/manifest.json`` (``uri`` may also name the manifest file itself).

    Raises FileNotFoundError when there is none, StorageError when unreadable."""
    if uri.rstrip("/").endswith("/" + MANIFEST_NAME) or uri == MANIFEST_NAME:
        uri = uri.rstrip("/")[: -len(MANIFEST_NAME)].rstrip("/") or "."
    store = Store(uri, storage_options)
    return _load(store)


def manifest_exists(uri: str, storage_options: dict | None = None) -> bool:
    """Whether a (finished) shard set lives at ``uri``: the manifest is written last."""
    return Store(uri, storage_options).size(MANIFEST_NAME) is not None


def verify_shards(uri: str, storage_options: dict | None = None, progress: bool = False) -> VerifyReport:
    """Re-hash every shard listed in the manifest and report missing, corrupt (size or sha256
    mismatch) and extra (unlisted ``<split>/<split>-NNNNNN.tar``) shards, leftover temporaries,
    and a manifest whose digest or sizes.json disagree with its shards. ``progress``: a tqdm bar
    on stderr, in bytes."""
    from .distributed import progress_bar

    store = Store(uri, storage_options)
    rep = VerifyReport(uri=store.uri, ok=False)
    try:
        m = _load(store)
    except (FileNotFoundError, StorageError) as exc:
        rep.problems.append(str(exc))
        return rep
    rep.digest = m.digest
    listed = m.shards()
    if dataset_digest(listed, m.schema_version) != m.digest:
        rep.problems.append(f"{MANIFEST_NAME}: dataset digest does not match its shard list")
    present = store.list_files()
    bar = progress_bar(sum(s.bytes for s in listed), "verify", progress, unit="B")
    for s in listed:
        rep.checked += 1
        got = store.sha256(s.name) if s.name in present else None
        bar.update(s.bytes)
        if got is None:
            rep.missing.append(s.name)
            rep.problems.append(f"{s.name}: missing")
        elif got[1] != s.bytes:
            rep.corrupt.append(s.name)
            rep.problems.append(f"{s.name}: size {got[1]} bytes, manifest says {s.bytes}")
        elif got[0] != s.sha256:
            rep.corrupt.append(s.name)
            rep.problems.append(f"{s.name}: sha256 {got[0][:16]}..., manifest says {s.sha256[:16]}...")
    bar.close()
    names = {s.name for s in listed}
    for name in sorted(present):
        if (SHARD_RE.match(name) and name not in names) or TMP_RE.search(name):
            rep.extra.append(name)
            rep.problems.append(f"{name}: not listed in the manifest")
    for split, info in m.splits.items():
        if sum(s.samples for s in info.shards) != info.images:
            rep.problems.append(f"{MANIFEST_NAME}: split {split} lists {info.images} images but its shards hold "
                                f"{sum(s.samples for s in info.shards)}")
    sizes = store.read_bytes(SIZES_NAME)
    try:
        if sizes is None or json.loads(sizes) != m.sizes():
            rep.problems.append(f"{SIZES_NAME}: missing or does not match the manifest")
    except ValueError:
        rep.problems.append(f"{SIZES_NAME}: invalid JSON")
    rep.ok = not rep.problems
    return rep
