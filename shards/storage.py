"""Storage for shard sets: local directories and ``s3://bucket/prefix`` via fsspec/s3fs.

Credentials come from the usual AWS sources (environment, ``~/.aws`` profiles, instance roles);
they are never passed through this module's messages or logs. The S3 endpoint can be set with
``storage_options={"endpoint_url": ...}`` or the ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``
environment variables (e.g. for a moto or MinIO server).

Writes are atomic: a local file is written under a hidden temporary name in the same directory
(``.NAME.tmp.PID``), fsynced and renamed into place; an S3 object is uploaded from a complete local
temporary file in one PUT (multipart uploads also appear only when complete), so a final name never
holds a partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from typing import IO

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

_CHUNK = 1 << 20
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

    def __init__(self, uri: str, storage_options: dict | None = None):
        uri = uri.rstrip("/") if uri not in ("/",) else uri
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

    # -- reading ------------------------------------------------------------------------------
    def size(self, name: str) -> int | None:
        """Size in bytes, or None when ``name`` does not exist."""
        with storage_errors(self.url(name)):
            if not self.remote:
                try:
                    return os.stat(self._path(name)).st_size
                except FileNotFoundError:
                    return None
            try:
                return int(self.fs.info(self._path(name), refresh=True)["size"])
            except FileNotFoundError:
                return None

    def read_bytes(self, name: str) -> bytes | None:
        """Content of ``name``, or None when it does not exist."""
        with storage_errors(self.url(name)):
            try:
                if not self.remote:
                    with open(self._path(name), "rb") as f:
                        return f.read()
                return self.fs.cat_file(self._path(name))
            except FileNotFoundError:
                return None

    def sha256(self, name: str) -> tuple[str, int] | None:
        """(sha256 hex, size) of ``name`` streamed in chunks, or None when it does not exist."""
        with storage_errors(self.url(name)):
            try:
                f = open(self._path(name), "rb") if not self.remote else self.fs.open(self._path(name), "rb")
            except FileNotFoundError:
                return None
            h, n = hashlib.sha256(), 0
            with f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    n += len(chunk)
            return h.hexdigest(), n

    def list_files(self, max_depth: int = 2) -> dict[str, int]:
        """Relative names -> sizes of the files at most ``max_depth`` levels below the root."""
        out: dict[str, int] = {}
        with storage_errors(self.uri):
            if not self.remote:
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
        with storage_errors(self.url(name)):
            if not self.remote:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._path(name))
                return
            try:
                self.fs.rm_file(self._path(name))
            except FileNotFoundError:
                pass

    def makedirs(self) -> None:
        with storage_errors(self.uri):
            if not self.remote:
                os.makedirs(self.root, exist_ok=True)



class AtomicFile:
    """A file being written to a temporary place; see :meth:`Store.open_atomic`."""

    def __init__(self, store: Store, name: str, file: IO[bytes], tmp: str):
        self.store, self.name, self.file, self._tmp = store, name, file, tmp

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
                    self.store.fs.put_file(self._tmp, self.store._path(self.name))
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
