"""Write a captioned image corpus as deterministic WebDataset shards.

``write_shards`` works in two phases:

1. Read the annotations and check every image (in a process pool when ``workers > 1``). With
   ``on_error="fail"`` any problem raises :class:`~shards.readers.InputError` here, before anything
   is written; with ``"skip"`` the bad samples go to the manifest's quarantine list.
2. Unless the output already holds a complete set with the same source digest and options (then
   nothing is written and ``Manifest.reused`` is True): delete the old manifest first, write every
   shard atomically, remove stale shards of an earlier run, then write ``sizes.json`` and, last,
   ``manifest.json``. An interrupted run therefore never leaves a manifest covering missing or
   partial shards.

Output is byte-identical for the same input and options, whatever ``workers`` is: samples are
ordered by a hash of their key (stable, and it spreads classes across shards), tar members are
sorted and carry fixed mtime/uid/gid/uname/mode.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import sys
import tarfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from .manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SHARD_RE,
    SIZES_NAME,
    Leak,
    Manifest,
    QuarantineEntry,
    ShardInfo,
    SplitInfo,
    _load,
    dataset_digest,
    shard_name,
)
from .readers import (
    ImageInfo,
    InputError,
    Listing,
    Problem,
    Sample,
    encode_image,
    inspect_image,
    read_annotations,
    read_file,
)
from .storage import TMP_RE, AtomicFile, StorageError, Store, TransientStorageError

__all__ = ["write_shards", "DEFAULT_SHARD_BYTES", "TAR_MTIME"]

log = logging.getLogger("shards")

DEFAULT_SHARD_BYTES = 1 << 30  # 1 GiB soft limit per shard
TAR_MTIME = 1577836800  # 2020-01-01T00:00:00Z, fixed for every member
_WINDOW = 2048  # samples handed to the process pool at a time (bounds memory)
_MAX_REPORT = 50
_KEEP_BYTES = 512 << 20  # image bytes kept in memory between the check and write phases


def _tar_member_bytes(size: int) -> int:
    return 512 + (size + 511) // 512 * 512


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = TAR_MTIME
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


_HEADER_TEMPLATE = _tarinfo("", 0).tobuf(tarfile.GNU_FORMAT, "utf-8", "strict")
_H_MID = _HEADER_TEMPLATE[100:124]  # mode, uid, gid
_H_MTIME = _HEADER_TEMPLATE[136:148]
_H_TAIL = _HEADER_TEMPLATE[156:]  # type, linkname, magic, uname, gname, ...
_H_SUM = sum(_H_MID) + sum(_H_MTIME) + sum(_H_TAIL) + 8 * 0x20  # checksum field counts as spaces
_MAX_FAST_SIZE = 8**11 - 1  # larger sizes need tarfile's base-256 encoding
_ZEROS = bytes(512)


def _tar_header(name: str, size: int) -> bytes:
    """The 512-byte GNU tar header tarfile would write for ``_tarinfo(name, size)``, assembled from
    a template (tarfile's own path is about 20x slower and dominated the writer's time)."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size > _MAX_FAST_SIZE:
        return _tarinfo(name, size).tobuf(tarfile.GNU_FORMAT, "utf-8", "strict")
    size_field = b"%011o\0" % size
    chksum = b"%06o\0 " % (_H_SUM + sum(raw) + sum(size_field))
    return b"".join((raw, _ZEROS[: 100 - len(raw)], _H_MID, size_field, _H_MTIME, chksum, _H_TAIL))


class _ShardWriter:
    """One tar shard being written atomically to the store (members written by hand with fixed
    metadata; the result is a plain GNU tar archive, as ``tarfile`` would write it)."""

    def __init__(self, store: Store, name: str):
        self.name = name
        self._af = store.open_atomic(name)
        self._f = self._af.file
        self._sha = hashlib.sha256()
        self.bytes = 0
        self.samples = 0
        self.planned = 1024  # end-of-archive blocks

    def _write(self, b: bytes) -> None:
        self._f.write(b)
        self._sha.update(b)
        self.bytes += len(b)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        parts = []
        for ext in sorted(members):
            data = members[ext]
            parts += (_tar_header(f"{key}.{ext}", len(data)), data, _ZEROS[: -len(data) % 512])
            self.planned += _tar_member_bytes(len(data))
        self._write(b"".join(parts))
        self.samples += 1

    def finish(self) -> tuple[ShardInfo, AtomicFile]:
        """End the archive; returns its info and the file to commit (which publishes it)."""
        end = 1024 + (-(self.bytes + 1024)) % tarfile.RECORDSIZE  # two zero blocks, padded to a record
        self._write(b"\0" * end)
        info = ShardInfo(name=self.name, bytes=self.bytes, sha256=self._sha.hexdigest(), samples=self.samples)
        return info, self._af

    def discard(self) -> None:
        self._af.discard()


class _Committer:
    """Publishes finished shards (fsync + rename, or S3 upload) in a background thread, so disk
    flushes and uploads overlap with writing the next shard. At most ``depth`` wait at a time."""

    def __init__(self, depth: int = 2):
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="shard-commit")
        self._pending: list[tuple[cf.Future, AtomicFile]] = []
        self._depth = depth

    def submit(self, af: AtomicFile) -> None:
        self._pending.append((self._pool.submit(af.commit), af))
        while sum(not f.done() for f, _ in self._pending) > self._depth:
            next(f for f, _ in self._pending if not f.done()).result()
        for f, _ in self._pending:
            if f.done():
                f.result()  # surface a failed commit early

    def wait(self) -> None:
        """Block until every shard is published; re-raise the first failure."""
        try:
            for f, _ in self._pending:
                f.result()
        finally:
            self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        """After an error: let running commits end, drop the queued ones."""
        for f, af in self._pending:
            if f.cancel():
                af.discard()
        self._pool.shutdown(wait=True)


def _order_key(sample: Sample) -> str:
    return hashlib.sha1(sample.key.encode()).hexdigest()


_JSON = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _sample_json(s: Sample) -> bytes:
    doc = {"captions": list(s.captions), "image_id": s.image_id, "filename": s.filename,
           "split": s.split, "corpus": s.corpus}
    return _JSON.encode(doc).encode("utf-8")


def _windowed_map(executor, fn, items: list, chunksize: int = 16) -> Iterator:
    """Ordered map; in a pool, submit at most ``_WINDOW`` items at a time."""
    if executor is None:
        yield from map(fn, items)
        return
    for start in range(0, len(items), _WINDOW):
        yield from executor.map(fn, items[start:start + _WINDOW], chunksize=chunksize)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr,
                mininterval=0.5, dynamic_ncols=True)


def _report(problems: list[Problem], listing: Listing) -> str:
    lines = [f"{len(problems)} problem(s) in corpus {listing.corpus} ({listing.annotations}):"]
    lines += [f"  {p}" for p in problems[:_MAX_REPORT]]
    if len(problems) > _MAX_REPORT:
        lines.append(f"  ... and {len(problems) - _MAX_REPORT} more")
    return "\n".join(lines)


def _size_warnings(listing: Listing, good: list[tuple[Sample, ImageInfo]]) -> list[str]:
    spec = listing.spec
    if spec is None or not good:
        return []
    want = (spec.image_size, spec.image_size)
    off = [(s, i) for s, i in good if (i.width, i.height) != want]
    if not off:
        return []
    s, i = off[0]
    return [f"{listing.annotations}: {len(off)} of {len(good)} images are not {want[0]}x{want[1]} as in "
            f"{spec.name} (e.g. {s.filename} is {i.width}x{i.height})"]


def _find_leaks(good: list[tuple[Sample, ImageInfo]]) -> list[Leak]:
    """Pairs of samples in different splits with identical image bytes (``exact``) or an identical
    8x8 average hash (``ahash``, near-duplicates such as re-encoded copies)."""
    groups: dict[tuple[str, object], list[Sample]] = defaultdict(list)
    for s, info in good:
        groups[("exact", info.sha256)].append(s)
        if info.ahash is not None:
            groups[("ahash", info.ahash)].append(s)
    seen: set[tuple[str, str]] = set()
    leaks: list[Leak] = []
    for kind in ("exact", "ahash"):
        for (k, _), members in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            if k != kind or len({m.split for m in members}) < 2:
                continue
            members = sorted(members, key=lambda m: (m.split, m.filename))
            for a, b in itertools.combinations(members, 2):
                if a.split == b.split or (a.key, b.key) in seen:
                    continue
                seen.add((a.key, b.key))
                leaks.append(Leak(kind=kind,
                                  a={"split": a.split, "filename": a.filename, "key": a.key},
                                  b={"split": b.split, "filename": b.filename, "key": b.key}))
    return leaks


def _source_digest(listing: Listing, good: list[tuple[Sample, ImageInfo]], problems: list[Problem],
                   options: dict) -> str:
    h = hashlib.sha256()
    head = {"schema_version": SCHEMA_VERSION, "annotations_sha256": listing.annotations_sha256,
            "corpus": listing.corpus, "options": options}
    if options.get("resize"):
        import PIL

        head["pillow"] = PIL.__version__  # re-encoded bytes depend on the encoder build
    h.update(json.dumps(head, sort_keys=True).encode())
    for s, info in sorted(good, key=lambda si: si[0].key):
        h.update(f"{s.key}\0{s.split}\0{s.filename}\0{info.sha256}\n".encode("utf-8", "surrogateescape"))
    for p in problems:
        h.update(f"!{p}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _is_complete(store: Store, m: Manifest) -> bool:
    present = store.list_files()
    if SIZES_NAME not in present:
        return False
    return all(present.get(s.name) == s.bytes for s in m.shards())


def _write_splits(store: Store, good: list[tuple[Sample, ImageInfo]], *, shard_size: int, shard_bytes: int,
                  resize: int | None, executor, progress: bool) -> dict[str, SplitInfo]:
    by_split: dict[str, list[tuple[Sample, ImageInfo]]] = defaultdict(list)
    for s, info in good:
        by_split[s.split].append((s, info))
    ordered: list[tuple[Sample, ImageInfo]] = []
    for split in sorted(by_split):
        ordered += sorted(by_split[split], key=lambda si: _order_key(si[0]))

    if resize:
        fn_items = [(s.image_path, resize, info.sha256) for s, info in ordered]
        payloads: Iterable[tuple[str, bytes]] = _windowed_map(executor, _encode_star, fn_items, chunksize=8)
    else:
        payloads = (_read_checked(s, info) for s, info in ordered)

    splits: dict[str, SplitInfo] = {}
    counts: dict[str, list[int]] = {}  # split -> [images, captions]
    current: _ShardWriter | None = None
    committer = _Committer()

    def finish(sw: _ShardWriter) -> None:
        info, af = sw.finish()
        splits[info.name.split("/")[0]].shards.append(info)
        committer.submit(af)

    bar = _progress(len(ordered), "write", progress)
    try:
        for (s, _info), (ext, data) in zip(ordered, payloads):
            si = splits.get(s.split)
            if si is None:
                if current is not None:
                    sw, current = current, None
                    finish(sw)
                si = splits[s.split] = SplitInfo(images=0, captions=0)
                counts[s.split] = [0, 0]
            meta = _sample_json(s)
            need = _tar_member_bytes(len(meta)) + _tar_member_bytes(len(data))
            if current is not None and (current.samples >= shard_size or current.planned + need > shard_bytes):
                sw, current = current, None
                finish(sw)
            if current is None:
                current = _ShardWriter(store, shard_name(s.split, len(si.shards)))
            current.add(s.key, {ext: data, "json": meta})
            c = counts[s.split]
            c[0] += 1
            c[1] += len(s.captions)
            bar.update(1)
        if current is not None:
            sw, current = current, None
            finish(sw)
        committer.wait()
    except BaseException:
        if current is not None:
            current.discard()
        committer.abandon()
        raise
    finally:
        bar.close()
    for split, (images, captions) in counts.items():
        splits[split].images, splits[split].captions = images, captions
    return splits


def _encode_star(args: tuple[str, int, str]) -> tuple[str, bytes]:
    return encode_image(*args)


def _read_checked(s: Sample, info: ImageInfo) -> tuple[str, bytes]:
    if info.data is not None:  # kept from the check phase
        return info.ext, info.data
    try:
        data = read_file(s.image_path)
    except OSError as exc:
        raise InputError(f"{s.filename}: image became unreadable while sharding: {exc.strerror or exc}") from exc
    if len(data) != info.size or hashlib.sha256(data).hexdigest() != info.sha256:
        raise InputError(f"{s.filename}: image changed while sharding")
    return info.ext, data


def write_shards(
    annotations: str | Path,
    images_dir: str | Path,
    out_uri: str,
    *,
    corpus: str | None = None,
    shard_size: int = 1000,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    resize: int | None = None,
    workers: int = 1,
    on_error: str = "fail",
    storage_options: dict | None = None,
    check_leaks: bool = False,
    full_decode: bool = False,
    progress: bool = True,
) -> Manifest:
    """Shard a corpus into ``out_uri`` (local path or ``s3://bucket/prefix``) and return its manifest.

    Args:
        annotations: Karpathy JSON, or generic JSONL/JSON list/CSV/TSV (see :mod:`shards.readers`).
        images_dir: folder the annotation filenames are relative to.
        out_uri: output root; ``<split>/<split>-NNNNNN.tar``, ``sizes.json``, ``manifest.json``.
        corpus: corpus name (rsicd, rsitmd, ucm, sydney or any name); detected when omitted.
        shard_size: at most this many samples per shard.
        shard_bytes: soft size limit per shard (a single larger sample gets a shard of its own).
        resize: re-encode images so the shorter side is at most this many px (JPEG stays JPEG,
            PNG/TIFF become PNG); None keeps the stored bytes.
        workers: processes for checking (and re-encoding) images; output does not depend on it.
        on_error: "fail" raises InputError before writing anything; "skip" quarantines bad samples.
        storage_options: fsspec options (e.g. ``{"endpoint_url": ...}``); never logged.
        check_leaks: find train/val/test duplicates (exact bytes and 8x8 average hash); decodes
            every image.
        full_decode: decode every image when checking (slower; catches corrupt pixel data that
            header, marker and CRC checks miss).
        progress: show tqdm progress bars on stderr.

    Raises:
        InputError: invalid annotations or, with on_error="fail", any bad sample (``.problems``).
        StorageError: the output could not be read or written (TransientStorageError when a retry
            may help).
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if shard_size < 1 or shard_bytes < 1 or workers < 1 or (resize is not None and resize < 1):
        raise ValueError("shard_size, shard_bytes, workers and resize must be positive")

    listing = read_annotations(annotations, images_dir, corpus)
    samples = listing.samples
    executor = None
    if workers > 1 and len(samples) > 1:
        executor = cf.ProcessPoolExecutor(min(workers, len(samples)), mp_context=multiprocessing.get_context("spawn"))
    try:
        # In-process, keep the checked bytes (up to a budget) so the write phase needs no second read.
        inspect = functools.partial(inspect_image, want_ahash=check_leaks, full_decode=full_decode,
                                    keep_data=executor is None)
        infos: list[ImageInfo] = []
        kept = 0
        bar = _progress(len(samples), "check", progress)
        for info in _windowed_map(executor, inspect, [s.image_path for s in samples], chunksize=32):
            if info.data is not None:
                kept += info.size
                if kept > _KEEP_BYTES or resize:
                    info = dataclasses.replace(info, data=None)
            infos.append(info)
            bar.update(1)
        bar.close()

        problems = list(listing.problems)
        good: list[tuple[Sample, ImageInfo]] = []
        for s, info in zip(samples, infos):
            if info.ok:
                good.append((s, info))
            else:
                problems.append(Problem(s.filename, info.reason, s.split, s.key))
        warnings = listing.warnings + _size_warnings(listing, good)
        for w in warnings[:20]:
            log.warning(w)
        if len(warnings) > 20:
            log.warning("... and %d more warnings (listed in the manifest)", len(warnings) - 20)
        if problems and on_error == "fail":
            raise InputError(_report(problems, listing), problems)
        if not good:
            raise InputError(f"{listing.annotations}: no valid samples to write", problems)
        for p in problems:
            log.warning("quarantined %s", p)

        leaks = _find_leaks(good) if check_leaks else None
        options = {"corpus": corpus, "shard_size": shard_size, "shard_bytes": shard_bytes, "resize": resize,
                   "on_error": on_error, "check_leaks": check_leaks, "full_decode": full_decode}
        source_digest = _source_digest(listing, good, problems, options)

        store = Store(out_uri, storage_options)
        try:
            old = _load(store)
        except TransientStorageError:
            raise
        except (FileNotFoundError, StorageError):  # no manifest, or an unreadable one: rewrite
            old = None
        # the source digest covers the schema version, annotations, image bytes and options
        if old is not None and old.source_digest == source_digest and _is_complete(store, old):
            log.info("%s is up to date (digest %s); nothing to write", store.uri, old.short_digest)
            old._reused = True
            return old

        store.makedirs()
        store.remove(MANIFEST_NAME)  # first: from here on the set is not valid until the new manifest lands
        store.remove(SIZES_NAME)
        splits = _write_splits(store, good, shard_size=shard_size, shard_bytes=shard_bytes, resize=resize,
                               executor=executor, progress=progress)
    finally:
        if executor is not None:
            executor.shutdown(cancel_futures=True)

    written = {sh.name for si in splits.values() for sh in si.shards}
    for name in sorted(store.list_files()):
        if (SHARD_RE.match(name) and name not in written) or TMP_RE.search(name):
            log.info("removing stale %s", name)
            store.remove(name)

    shards = [sh for split in sorted(splits) for sh in splits[split].shards]
    manifest = Manifest(
        corpus=listing.corpus,
        annotations=listing.annotations,
        source_digest=source_digest,
        digest=dataset_digest(shards),
        splits={k: splits[k] for k in sorted(splits)},
        options=options,
        quarantine=[QuarantineEntry(**p.to_dict()) for p in problems],
        warnings=warnings,
        leaks=leaks,
    )
    store.write_bytes(SIZES_NAME, (json.dumps(manifest.sizes(), indent=1, sort_keys=True) + "\n").encode())
    store.write_bytes(MANIFEST_NAME, manifest.to_json())  # last
    manifest._base_uri = store.uri
    log.info("wrote %d shards to %s (digest %s)", len(shards), store.uri, manifest.short_digest)
    return manifest
