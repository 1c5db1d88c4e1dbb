"""Storage for shard sets: local directories and ``s3://bucket/prefix`` via fsspec/s3fs.

Credentials come from the usual AWS sources (environment, ``~/.aws`` profiles, instance roles);
they are never passed through this module's messages or logs. The S3 endpoint can be set with
``storage_options={"endpoint_url": ...}`` or the ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
environment variables (e.g. for a moto or MinIO server).

Writes are atomic: a local file is written under a hidden temporary name in the same directory
(``.NAME.tmp.PID``), fsynced and renamed into place; an S3 object is uploaded from a complete local
temporary file in one PUT (multipart uploads also appear only when complete), so a final name never
holds a partial file.

Remote operations that fail with a :class:`TransientStorageError` (endpoint unreachable, connection
reset, timeout, 5xx) are retried with backoff (0.25 s doubling to 2 s) for up to ``RETRY_SECONDS``
(30 s, ``Store(retry_seconds=...)``) from the first failure, on top of botocore's own retries; then the
error is raised saying how long it was retried. Each retry is logged as a warning (logger ``shards``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TypeVar

__all__ = [
    "StorageError",
    "TransientStorageError",
    "Store",
    "AtomicFile",
    "open_url",
    "register_webdataset_s3",
    "resolve_storage_options",
    "endpoint_options",
    "is_remote",
]

log = logging.getLogger("shards")
_T = TypeVar("_T")
_CHUNK = 1 << 20
RETRY_SECONDS = 30.0  # how long a remote operation failing with TransientStorageError is retried
# Temporary files left by an interrupted local write: ".NAME.tmp.PID" in the target directory.
TMP_RE = re.compile(r"(^|/)\.[^/]+\.tmp\.\d+$")


class StorageError(Exception):
    """Reading or writing the shard store failed (permissions, missing bucket, bad endpoint...)."""


class TransientStorageError(StorageError):
    """A storage failure that may succeed when retried (connection reset, timeout, 5xx)."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def endpoint_options(endpoint_url: str | None) -> dict | None:
    """Storage options naming an S3 endpoint (None: the AWS default / AWS_ENDPOINT_URL)."""
    return {"endpoint_url": endpoint_url} if endpoint_url else None


def resolve_storage_options(uri: str, storage_options: dict | None = None) -> dict:
    """Storage options for ``uri``: a copy of ``storage_options`` plus the endpoint from the
    ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` environment when none was given."""
    opts = dict(storage_options or {})
    if uri.startswith(("s3://", "s3a://")):
        has_endpoint = "endpoint_url" in opts or "endpoint_url" in opts.get("client_kwargs", {})
        env = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if not has_endpoint and env:
            opts["endpoint_url"] = env
    return opts


def _classify(exc: BaseException, what: str) -> StorageError:
    """Map a backend exception to StorageError / TransientStorageError (message without secrets)."""
    if isinstance(exc, StorageError):
        return exc
    name = type(exc).__name__
    text = str(exc).splitlines()[0][:300] if str(exc) else name
    transient_names = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
                       "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError",
                       "ClientOSError", "ClientPayloadError")
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return StorageError(f"{what}: {text}")
    if name in ("NoCredentialsError", "PartialCredentialsError", "ParamValidationError"):
        return StorageError(f"{what}: {name}: {text}")
    if (isinstance(exc, (ConnectionError, TimeoutError)) or name in transient_names
            or re.search(r"\b(5\d\d|SlowDown|RequestTimeout|InternalError|ServiceUnavailable)\b", text)):
        return TransientStorageError(f"{what}: {name}: {text}")
    if isinstance(exc, OSError):
        return StorageError(f"{what}: {text}")
    return StorageError(f"{what}: {name}: {text}")


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Re-raise backend exceptions as StorageError (or TransientStorageError) naming ``what``."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:  # botocore errors are subclasses of these or Exception
        raise _classify(exc, what) from exc
    except Exception as exc:  # noqa: BLE001 - botocore.ClientError etc.
        if type(exc).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec"):
            raise _classify(exc, what) from exc
        raise


def _filesystem(uri: str, storage_options: dict | None):
    import fsspec

    opts = resolve_storage_options(uri, storage_options)
    fs, path = fsspec.core.url_to_fs(uri, **opts)
    return fs, path


def open_url(url: str, mode: str = "rb", storage_options: dict | None = None) -> IO[bytes]:
    """Open a local path or remote URL (``s3://...``) with fsspec."""
    if not is_remote(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        with storage_errors(path):
            return open(path, mode)
    with storage_errors(url):
        fs, path = _filesystem(url, storage_options)
        return fs.open(path, mode)


def register_webdataset_s3(storage_options: dict | None = None) -> None:
    """Let webdataset read ``s3://`` URLs through s3fs (installs ``webdataset.gopen_schemes["s3"]``).

    ``storage_options`` (e.g. ``{"endpoint_url": "http://127.0.0.1:9000"}``) are bound now; the
    ``AWS_ENDPOINT_URL`` environment is honoured when no endpoint is given."""
    import webdataset

    opts = dict(storage_options or {})

    def gopen_s3(url, mode="rb", bufsize=8192, **kw):
        if mode != "rb":
            raise ValueError(f"{url}: the s3 handler only reads (mode {mode!r})")
        return open_url(url, "rb", opts)

    webdataset.gopen_schemes["s3"] = gopen_s3  # the dict webdataset.gopen() consults at call time


class Store:
    """A shard-set root (local directory or remote prefix) addressed by relative POSIX names."""

    def __init__(self, uri: str, storage_options: dict | None = None, retry_seconds: float | None = None):
        uri = uri.rstrip("/") if uri not in ("/",) else uri
        self.retry_seconds = RETRY_SECONDS if retry_seconds is None else retry_seconds
        self.remote = is_remote(uri)
        if self.remote:
            self.uri = uri
            with storage_errors(uri):
                self.fs, self.root = _filesystem(uri, storage_options)
            self.root = self.root.rstrip("/")
        else:
            path = uri[len("file://"):] if uri.startswith("file://") else uri
            self.root = os.path.abspath(path)
            self.uri = self.root
            self.fs = None

    # -- addressing ---------------------------------------------------------------------------
    @staticmethod
    def join(base_uri: str, name: str) -> str:
        """``base_uri`` + relative POSIX ``name`` (a URL for remote bases, an OS path otherwise)."""
        if is_remote(base_uri):
            return f"{base_uri.rstrip('/')}/{name}"
        return os.path.join(base_uri, *name.split("/"))

    def url(self, name: str) -> str:
        return self.join(self.uri, name)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.remote else self.url(name)

    def _io(self, what: str, op: Callable[[], _T]) -> _T:
        """``op()`` with backend errors raised as StorageError naming ``what``; on a remote store a
        TransientStorageError is retried (module docstring) before it is raised."""
        deadline, delay = None, 0.25
        while True:
            try:
                with storage_errors(what):
                    return op()
            except TransientStorageError as exc:
                if not self.remote:
                    raise
                now = time.monotonic()
                deadline = now + self.retry_seconds if deadline is None else deadline
                if now >= deadline:
                    raise TransientStorageError(
                        f"{exc} (still failing after retrying for {self.retry_seconds:g} s)") from exc
                wait = min(delay, deadline - now)
                log.warning("%s; retrying in %.2g s", exc, wait)
                time.sleep(wait)
                delay = min(2 * delay, 2.0)

    # -- reading ------------------------------------------------------------------------------
    def size(self, name: str) -> int | None:
        """Size in bytes, or None when ``name`` does not exist."""
        path = self._path(name)

        def op() -> int | None:
            try:
                if not self.remote:
                    return os.stat(path).st_size
                return int(self.fs.info(path, refresh=True)["size"])
            except FileNotFoundError:
                return None

        return self._io(self.url(name), op)

    def read_bytes(self, name: str) -> bytes | None:
        """Content of ``name``, or None when it does not exist."""
        path = self._path(name)

        def op() -> bytes | None:
            try:
                if not self.remote:
                    with open(path, "rb") as f:
                        return f.read()
                return self.fs.cat_file(path)
            except FileNotFoundError:
                return None

        return self._io(self.url(name), op)

    def sha256(self, name: str) -> tuple[str, int] | None:
        """(sha256 hex, size) of ``name`` streamed in chunks, or None when it does not exist."""
        return self._stream(name, None)

    def download(self, name: str, dest: str | os.PathLike[str]) -> tuple[str, int] | None:
        """Copy ``name`` to the local file ``dest`` (overwritten) and return its (sha256 hex, size), or
        None when it does not exist. A transient failure restarts the copy, retried as every remote read."""
        return self._stream(name, dest)

    def _stream(self, name: str, dest: str | os.PathLike[str] | None) -> tuple[str, int] | None:
        path = self._path(name)

        def op() -> tuple[str, int] | None:
            try:
                f = open(path, "rb") if not self.remote else self.fs.open(path, "rb")
            except FileNotFoundError:
                return None
            h, n = hashlib.sha256(), 0
            with f, (open(dest, "wb") if dest is not None else contextlib.nullcontext()) as out:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    n += len(chunk)
                    if out is not None:
                        out.write(chunk)
            return h.hexdigest(), n

        return self._io(self.url(name), op)

    def list_files(self, max_depth: int = 2) -> dict[str, int]:
        """Relative names -> sizes of the files at most ``max_depth`` levels below the root."""

        def local() -> dict[str, int]:
            out: dict[str, int] = {}
            if not os.path.isdir(self.root):
                return out

            def walk(d: str, rel: str, depth: int) -> None:
                with os.scandir(d) as it:
                    for e in it:
                        name = f"{rel}{e.name}"
                        if e.is_file(follow_symlinks=False):
                            out[name] = e.stat(follow_symlinks=False).st_size
                        elif e.is_dir(follow_symlinks=False) and depth < max_depth:
                            walk(e.path, name + "/", depth + 1)

            walk(self.root, "", 1)
            return out

        def remote() -> dict[str, int]:
            out: dict[str, int] = {}
            self.fs.invalidate_cache()
            try:
                found = self.fs.find(self.root, maxdepth=max_depth, detail=True)
            except FileNotFoundError:
                return out
            for path, info in found.items():
                if info.get("type", "file") != "file":
                    continue
                rel = path[len(self.root):].lstrip("/")
                if rel:
                    out[rel] = int(info.get("size") or 0)
            return out

        return self._io(self.uri, remote if self.remote else local)

    # -- writing ------------------------------------------------------------------------------
    def open_atomic(self, name: str) -> AtomicFile:
        """A temporary file whose :meth:`AtomicFile.commit` makes it appear at ``name`` in one step
        (and :meth:`AtomicFile.discard` drops it). Commit may run in another thread."""
        if not self.remote:
            final = self._path(name)
            d, base = os.path.split(final)
            tmp = os.path.join(d, f".{base}.tmp.{os.getpid()}")
            with storage_errors(final):
                os.makedirs(d, exist_ok=True)
                return AtomicFile(self, name, open(tmp, "wb"), tmp)
        with storage_errors(self.url(name)):
            f = tempfile.NamedTemporaryFile(prefix="msa-shard-", suffix=".part")
        return AtomicFile(self, name, f, f.name)

    @contextlib.contextmanager
    def atomic_writer(self, name: str) -> Iterator[IO[bytes]]:
        """Yield a binary file; on normal exit its content appears at ``name`` atomically, on an
        exception nothing appears (the temporary is removed)."""
        af = self.open_atomic(name)
        try:
            yield af.file
        except BaseException:
            af.discard()
            raise
        af.commit()

    def write_bytes(self, name: str, data: bytes) -> None:
        with self.atomic_writer(name) as f:
            f.write(data)

    def remove(self, name: str) -> None:
        """Delete ``name`` if present."""
        path = self._path(name)

        def op() -> None:
            with contextlib.suppress(FileNotFoundError):
                if not self.remote:
                    os.unlink(path)
                else:
                    self.fs.rm_file(path)

        self._io(self.url(name), op)

    def makedirs(self) -> bool:
        """Create the root folder (local); True when it did not exist."""
        with storage_errors(self.uri):
            if self.remote or os.path.isdir(self.root):
                return False
            os.makedirs(self.root, exist_ok=True)
            return True

    def remove_empty_folders(self, folders: Iterable[str], root: bool = False) -> None:
        """Remove these folders (names under the root) where empty, then the root too when ``root``
        and empty (local; S3 has no folders)."""
        if self.remote:
            return
        paths = [self._path(f) for f in sorted(set(folders) - {""}, reverse=True)]  # deeper ones first
        for path in paths + [self.root] * root:
            with contextlib.suppress(OSError):  # not empty, or gone
                os.rmdir(path)



class _GuardedFile:
    """The temporary file of an :class:`AtomicFile`: its writes raise StorageError naming the final
    name (a full disk is ``StorageError("DIR/NAME.tar: [Errno 28] No space left on device")``, not a
    bare OSError from deep inside the writer)."""

    def __init__(self, file: IO[bytes], url: str):
        self._file, self._url = file, url

    def write(self, data: bytes) -> int:
        try:
            return self._file.write(data)
        except OSError as exc:
            raise _classify(exc, self._url) from exc

    def __getattr__(self, attr: str):
        return getattr(self._file, attr)


class AtomicFile:
    """A file being written to a temporary place; see :meth:`Store.open_atomic`."""

    def __init__(self, store: Store, name: str, file: IO[bytes], tmp: str):
        self.store, self.name, self._tmp = store, name, tmp
        self.file = _GuardedFile(file, store.url(name))

    def commit(self) -> None:
        """Local: flush, fsync, rename into place. S3: one PUT of the complete file."""
        url = self.store.url(self.name)
        try:
            with storage_errors(url):
                self.file.flush()
                if not self.store.remote:
                    os.fsync(self.file.fileno())
                    self.file.close()
                    os.replace(self._tmp, self.store._path(self.name))
                else:
                    self.store._io(url, lambda: self.store.fs.put_file(self._tmp, self.store._path(self.name)))
                    self.file.close()  # a NamedTemporaryFile: deleted on close
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        if not self.store.remote:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
