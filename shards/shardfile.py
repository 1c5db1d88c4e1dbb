"""One shard file: a plain GNU tar written by hand with fixed member metadata, hashed while it is
written and published atomically.

A :class:`ShardPlan` names a shard and its members (paths and metadata, never image bytes);
:func:`write_plans` turns plans into files. It is the whole write phase in-process, and
:func:`write_batch` is the same in a worker process or a Ray task, so this module imports nothing
heavy. :func:`check_and_write` is a task's one pass over draft plans (check each image, write the
good ones: a first write reads and hashes every image once). The same plan
gives the same bytes wherever it is written, and :func:`content_key` says which bytes those are.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import functools
import hashlib
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .manifest import ShardInfo
from .readers import (
    MEMBER_EXT_LEN,
    ImageInfo,
    InputError,
    encode_image,
    image_digest,
    inspect_image,
    read_file,
    reencode,
)
from .storage import AtomicFile, Store

__all__ = ["TAR_MTIME", "END_BYTES", "Member", "ShardPlan", "tar_member_bytes", "content_key", "write_plans",
           "write_batch", "check_and_write"]

TAR_MTIME = 1577836800  # 2020-01-01T00:00:00Z, fixed for every member
END_BYTES = 1024  # the two zero blocks that end an archive


def tar_member_bytes(name_bytes: int, size: int) -> int:
    """Bytes of one member in the archive: its header (after a GNU longname header and blocks when
    the name is over 100 bytes, as tarfile writes it) and its data padded to whole blocks."""
    longname = 512 + (name_bytes + 512) // 512 * 512 if name_bytes > 100 else 0  # name + NUL, padded
    return longname + 512 + (size + 511) // 512 * 512


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
_FLUSH_BYTES = 1 << 20  # bytes handed to the file and the hasher at a time


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte GNU tar header tarfile would write for ``_tarinfo(name, size)``, assembled from
    a template (tarfile's own path is about 20x slower and dominated the writer's time)."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size > _MAX_FAST_SIZE:
        return _tarinfo(name, size).tobuf(tarfile.GNU_FORMAT, "utf-8", "strict")
    size_field = b"%011o\0" % size
    chksum = b"%06o\0 " % (_H_SUM + sum(raw) + sum(size_field))
    return b"".join((raw, _ZEROS[: 100 - len(raw)], _H_MID, size_field, _H_MTIME, chksum, _H_TAIL))


@dataclass(slots=True)
class Member:
    """One sample as the write phase needs it: where its image is, what the check phase saw there
    (size, digest, member extension) and its json member. Slotted, pickled as its fields and not
    frozen, as :class:`~shards.readers.ImageInfo` is (one per sample, in the driver's plans and its tasks)."""

    key: str
    path: str
    ext: str
    size: int
    digest: str  # image_digest of the stored bytes
    meta: bytes

    def tar_bytes(self) -> int:
        """Bytes of its two tar members with the stored image (re-encoding changes the image's); the
        same for a draft, whose extension is not known yet."""
        key = len(self.key.encode("utf-8"))
        image = tar_member_bytes(key + 1 + MEMBER_EXT_LEN, self.size)
        return tar_member_bytes(key + len(".json"), len(self.meta)) + image

    def __reduce__(self):
        return Member, (self.key, self.path, self.ext, self.size, self.digest, self.meta)


@dataclass(frozen=True)
class ShardPlan:
    """A shard to write: its name, its content key (:func:`content_key`) and its members in
    canonical order."""

    name: str
    content: str
    members: tuple[Member, ...]


def content_key(members: Sequence[Member], salt: str) -> str:
    """What a shard's bytes depend on: its members' keys, image digests and json members, in order,
    and ``salt`` (layout version and re-encoding options). Equal keys mean byte-identical shards."""
    h = hashlib.sha256(salt.encode())
    for m in members:
        h.update(f"\n{m.key}\0{m.ext}\0{m.digest}\0{len(m.meta)}\0".encode("utf-8", "surrogateescape"))
        h.update(m.meta)
    return h.hexdigest()


class _ShardWriter:
    """One tar shard being written atomically to the store. Its sha256 is computed in ``hasher``'s
    thread, a megabyte at a time, while the calling thread writes the same bytes and assembles the
    next ones (hashlib and file writes release the GIL: the two overlap on two cores)."""

    def __init__(self, store: Store, name: str, hasher: cf.Executor):
        self.name = name
        self._af = store.open_atomic(name)
        self._f = self._af.file
        self._sha = hashlib.sha256()
        self._hasher = hasher
        self._hashing: cf.Future | None = None
        self._parts: list[bytes] = []
        self._pending = 0  # bytes in _parts
        self.bytes = 0
        self.samples = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext in sorted(members):
            data = members[ext]
            header, pad = tar_header(f"{key}.{ext}", len(data)), _ZEROS[: -len(data) % 512]
            self._parts += (header, data, pad)
            self._pending += len(header) + len(data) + len(pad)
        self.samples += 1
        if self._pending >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        chunk = b"".join(self._parts)  # one buffer: one write, one GIL-free update (small ones hold the GIL)
        self._parts = []
        self.bytes += self._pending
        self._pending = 0
        self._wait_hash()
        self._hashing = self._hasher.submit(self._sha.update, chunk)
        self._f.write(chunk)

    def _wait_hash(self) -> None:
        if self._hashing is not None:
            self._hashing.result()
            self._hashing = None

    def finish(self, content: str) -> tuple[ShardInfo, AtomicFile]:
        """End the archive; returns its info and the file to commit (which publishes it)."""
        size = self.bytes + self._pending
        self._parts.append(bytes(END_BYTES + (-(size + END_BYTES)) % tarfile.RECORDSIZE))  # zero blocks, padded
        self._pending += len(self._parts[-1])
        self._flush()
        self._wait_hash()
        info = ShardInfo(name=self.name, bytes=self.bytes, sha256=self._sha.hexdigest(), samples=self.samples,
                         content=content)
        return info, self._af

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self._wait_hash()
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


class _WriteRun:
    """Shards written one after another, sharing one hashing thread and one publishing thread
    (:class:`_Committer`). As a context manager: on a clean exit every shard is published; on an
    error the shard being written is discarded and queued commits are dropped."""

    def __init__(self, store: Store):
        self._store = store
        self._committer = _Committer()
        self._hasher = cf.ThreadPoolExecutor(1, thread_name_prefix="shard-sha256")
        self._current: _ShardWriter | None = None

    def open(self, name: str) -> _ShardWriter:
        self._current = _ShardWriter(self._store, name, self._hasher)
        return self._current

    def publish(self, content: str) -> ShardInfo:
        """End the open shard and queue it for publication; returns its info."""
        info, af = self._current.finish(content)
        self._current = None
        self._committer.submit(af)
        return info

    def drop(self) -> None:
        """Discard the open shard."""
        self._current.discard()
        self._current = None

    def __enter__(self) -> _WriteRun:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._committer.wait()
            else:
                if self._current is not None:
                    self._current.discard()
                self._committer.abandon()
        finally:
            self._hasher.shutdown(wait=True)


def read_member(m: Member, resize: int | None = None) -> tuple[str, bytes]:
    """(extension, bytes) of ``m``'s image as stored (re-encoded with ``resize``), refusing a file
    that changed since the check phase."""
    if resize:
        return encode_image(m.path, resize, m.digest)
    try:
        data = read_file(m.path)
    except OSError as exc:
        raise InputError(f"{m.path}: image became unreadable while sharding: {exc.strerror or exc}") from exc
    if len(data) != m.size or image_digest(data) != m.digest:
        raise InputError(f"{m.path}: image changed while sharding")
    return m.ext, data


def write_plans(store: Store, plans: Iterable[ShardPlan], load: Callable[[Member], tuple[str, bytes]],
                on_shard: Callable[[ShardInfo], None] | None = None) -> list[ShardInfo]:
    """Write every planned shard (``load`` gives a member's image); returns their infos in order.
    On an error nothing half-written is published."""
    infos: list[ShardInfo] = []
    with _WriteRun(store) as run:
        for plan in plans:
            shard = run.open(plan.name)
            for m in plan.members:
                ext, data = load(m)
                shard.add(m.key, {ext: data, "json": m.meta})
            info = run.publish(plan.content)
            infos.append(info)
            if on_shard is not None:
                on_shard(info)
    return infos


def write_batch(uri: str, storage_options: dict | None, resize: int | None, plans: list[ShardPlan]) -> list[ShardInfo]:
    """A worker's task (process pool or Ray): write whole shards, reading each image itself."""
    return write_plans(Store(uri, storage_options), plans, functools.partial(read_member, resize=resize))


@dataclass(frozen=True)
class CheckOptions:
    """How :func:`check_and_write` checks images (see :func:`shards.readers.inspect_image`) and
    whether it writes: ``stop_on_problem``: nothing more once an image fails (``on_error="fail"``);
    ``write`` False: check only (the later tasks of a first write that is going to fail)."""

    want_ahash: bool
    full_decode: bool
    stop_on_problem: bool
    resize: int | None
    salt: str  # content_key's salt
    write: bool = True


def check_and_write(uri: str, storage_options: dict | None,
                    task: tuple[CheckOptions, list[ShardPlan]]) -> list[tuple[tuple[ImageInfo, ...], ShardInfo | None]]:
    """A worker's task for a first write: check each draft's images and write the good ones as the
    draft's shard, in one pass (each image read and hashed once). A draft's members carry the file
    sizes the driver planned with and no format or digest; the shard gets the content key of what
    was written, so the driver keeps it only if its final plan (from every image's check) is the
    same. Returns per draft the members' image infos (without their bytes) and the shard written
    (None: every image failed, an earlier one did with ``stop_on_problem``, or not ``write``)."""
    opts, drafts = task
    results: list[tuple[tuple[ImageInfo, ...], ShardInfo | None]] = []
    failed = not opts.write
    with _WriteRun(Store(uri, storage_options)) as run:
        for draft in drafts:
            infos: list[ImageInfo] = []
            written: list[Member] = []
            shard = None if failed else run.open(draft.name)
            for m in draft.members:
                info = inspect_image(m.path, opts.want_ahash, opts.full_decode, keep_data=True)
                infos.append(info.without_data() if info.data is not None else info)
                if not info.ok:
                    if opts.stop_on_problem and shard is not None:
                        run.drop()
                        shard, failed = None, True
                    continue
                if shard is None:
                    continue
                member = Member(m.key, m.path, info.ext, info.size, info.digest, m.meta)
                ext, data = reencode(info.data, opts.resize) if opts.resize else (info.ext, info.data)
                shard.add(m.key, {ext: data, "json": m.meta})
                written.append(member)
            published = None
            if shard is not None and written:
                published = run.publish(content_key(written, opts.salt))
            elif shard is not None:
                run.drop()
            results.append((tuple(infos), published))
    return results
