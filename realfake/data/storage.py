"""Storage: one dataset version under one fsspec URI.

Every stage reads and writes through a :class:`Store` rooted at ``{root}/{dataset}/{version}``, so the
same code runs on a laptop folder (``./out``, ``file://``) and on object storage (``s3://bucket/prefix``).
Object stores have no atomic rename, so small records are written whole in one ``put`` and large ones
follow the shard commit protocol (:mod:`realfake.data.shards`): write, verify, then commit. A write refused for
lack of room (a full disk, an exhausted quota, a file or object larger than allowed) raises
:class:`StorageFullError`, which names the filesystem and what to do; the object keeps its previous content.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from realfake.redact import exception_chain, redact

if TYPE_CHECKING:
    from realfake.config import StorageConfig

__all__ = [
    "IO_ATTEMPTS",
    "IO_BACKOFF_S",
    "Store",
    "StorageError",
    "StorageFullError",
    "dataset_store",
    "describe_location",
    "full_error",
    "io_retry",
    "is_transient_io",
    "local_location",
    "out_of_space",
    "read_parquet",
    "resolve_storage_options",
    "version_store",
]

log = logging.getLogger(__name__)


class StorageError(OSError):
    """A read or write on the dataset store failed; the message names the URI."""


class StorageFullError(StorageError):
    """A write was refused for lack of room: the filesystem is full, a quota is exhausted, or the file or object
    is larger than the filesystem, the process limit or the object store allows.

    Not transient: retrying cannot help until someone frees space or raises the limit. The message names the
    object, the filesystem and what to do; ``kind`` is ``space``, ``quota``, ``file size`` or ``object size``.
    """

    def __init__(self, message: str, kind: str = "space") -> None:  # a default, so that pickling round-trips
        super().__init__(message)
        self.kind = kind


# errno values and object-store error codes that mean "no room for this write". EFBIG (a file past the
# filesystem's maximum or the process's RLIMIT_FSIZE) leaves the data as unwritten as ENOSPC does.
_FULL_ERRNOS = {errno.ENOSPC: "space", getattr(errno, "EDQUOT", -1): "quota", errno.EFBIG: "file size"}
_FULL_CODES = {
    "QuotaExceeded": "quota",  # Ceph RGW (user / bucket quota)
    "XMinioAdminBucketQuotaExceeded": "quota",  # MinIO bucket quota
    "XMinioStorageFull": "space",  # MinIO: drives below their free-space threshold (HTTP 507)
    "InsufficientStorage": "space",
    "EntityTooLarge": "object size",  # S3: a single PUT above the service's object limit
}
_FULL_STATUS = {507: "space", 413: "object size"}  # Insufficient Storage, Payload Too Large
_FULL_REASON = {
    "space": "no space left",
    "quota": "quota exceeded",
    "file size": "file larger than this process or the filesystem allows",
    "object size": "object larger than the store accepts",
}
_FULL_ADVICE = {
    "space": "Free space there",
    "quota": "Raise the quota or delete data under it",
    "file size": "Raise the limit (`ulimit -f` of the process, or the filesystem's maximum file size)",
    "object size": "Lower the object size (shards.max_bytes for shards)",
}


def out_of_space(exc: BaseException) -> str | None:
    """The kind of "no room" behind an error (``space``, ``quota``, ``file size``, ``object size``), or None.

    Looks through the whole chain of causes, because the original error arrives wrapped: an ``OSError`` with
    ``ENOSPC`` / ``EDQUOT`` / ``EFBIG`` from a local file, or a botocore ``ClientError`` (code ``QuotaExceeded``,
    ``XMinioStorageFull``, ``EntityTooLarge``, HTTP 507, ...) that s3fs re-raises as a plain ``OSError``.
    """
    for e in exception_chain(exc):
        if isinstance(e, StorageFullError):
            return e.kind
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return _FULL_ERRNOS[e.errno]
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = (response.get("Error") or {}).get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in _FULL_CODES:
                return _FULL_CODES[code]
            if status in _FULL_STATUS:
                return _FULL_STATUS[status]
    return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def local_location(path: str) -> str:
    """``the local filesystem mounted at /x (N free of M)`` for a local path (which need not exist yet)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    mount = p
    while not os.path.ismount(mount) and os.path.dirname(mount) != mount:
        mount = os.path.dirname(mount)
    try:
        usage = shutil.disk_usage(p)
        return f"the local filesystem mounted at {mount} ({_size(usage.free)} free of {_size(usage.total)})"
    except OSError:
        return f"the local filesystem mounted at {mount}"


def describe_location(store: Store, *parts: str) -> str:
    """Where an object of ``store`` lives, for messages: the local mount point and its free space, or the bucket
    (and endpoint) of an object store."""
    if store.local:
        return local_location(store.path(*parts))
    bucket = store.path(*parts).lstrip("/").split("/", 1)[0]
    opts = store.storage_options
    endpoint = opts.get("endpoint_url") or (opts.get("client_kwargs") or {}).get("endpoint_url")
    return f"the {store.protocol} bucket {bucket!r}" + (f" at {endpoint}" if endpoint else "")


def full_error(what: str, where: str, kind: str, cause: BaseException, outcome: str, rerun: str,
               storage_options: dict[str, Any] | None = None) -> StorageFullError:
    """A :class:`StorageFullError`: what failed, on which filesystem and why, what was kept, and what to do.

    Args:
        what: The write that failed, with the object's URI (``cannot write s3://b/x/dataset.json``); the message
            goes on with `` on {where}: {reason} ({cause}).``
        where: The filesystem (:func:`describe_location`).
        kind: The kind of :func:`out_of_space`.
        cause: The original error; its text is kept, with secrets masked.
        outcome: What the store holds now (``Nothing was replaced.``).
        rerun: The end of the advice (``then re-run the same command``).
        storage_options: Their secrets are masked from the message too.
    """
    while isinstance(cause, StorageFullError) and cause.__cause__ is not None:
        cause = cause.__cause__  # quote the refusal itself, not a message already built around it
    cause_text = redact(f"{type(cause).__name__}: {cause}", storage_options)
    message = f"{what} on {where}: {_FULL_REASON[kind]} ({cause_text}). {outcome} {_FULL_ADVICE[kind]}, {rerun}."
    return StorageFullError(redact(message, storage_options), kind)


class Store:
    """A folder on any fsspec filesystem, addressed by paths relative to its root."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.local = self.protocol in ("file", "local")
        self.root = root.rstrip("/") if root not in ("/", "") else root
        self.storage_options = dict(storage_options or {})

    # -- addressing ---------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Filesystem path (no protocol) of a relative path."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def uri(self, *parts: str) -> str:
        """Full URI of a relative path, with its protocol, for messages and other tools."""
        p = self.path(*parts)
        return p if self.local else f"{self.protocol}://{p}"

    def child(self, *parts: str) -> Store:
        """A store rooted at a sub-folder, sharing this filesystem."""
        s = object.__new__(Store)
        s.fs, s.protocol, s.local = self.fs, self.protocol, self.local
        s.root = self.path(*parts)
        s.storage_options = self.storage_options
        return s

    # -- queries ------------------------------------------------------------------------------------------
    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self.path(*parts)))

    def listdir(self, *parts: str) -> list[str]:
        """Names (not paths) directly under a folder; empty if it does not exist."""
        p = self.path(*parts)
        try:
            entries = self.fs.ls(p, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def size(self, *parts: str) -> int:
        return int(self.fs.size(self.path(*parts)))

    # -- whole-object I/O ---------------------------------------------------------------------------------
    def _whole_get(self) -> dict[str, Any]:
        """Arguments that make a whole-object read one GET. s3fs otherwise looks the size up first (to split large
        objects into parallel ranged GETs): an extra HEAD, and one answered from its listing cache, which can
        predate an object another process has written since - a "missing" object that exists."""
        return {"max_concurrency": 1} if hasattr(self.fs, "max_concurrency") else {}

    def read_bytes(self, *parts: str) -> bytes:
        """A whole object, in one request on object stores."""
        try:
            return self.fs.cat_file(self.path(*parts), **self._whole_get())
        except FileNotFoundError:
            raise
        except Exception as e:  # network / permission errors from any backend
            raise StorageError(f"cannot read {self.uri(*parts)}: {e}") from e

    def write_bytes(self, data: bytes, *parts: str, durable: bool = True) -> None:
        """Write a whole object. Local files appear atomically (temp file + rename); object stores put whole.

        Args:
            data: The object's bytes.
            *parts: Its path relative to the store root.
            durable: Local files only: fsync before the rename, so the object survives a power loss and not only
                the death of the process. Without it the rename is still atomic for every reader and crash of the
                writer; object stores acknowledge a put only once it is stored, so the flag changes nothing there.
        """
        target = self.path(*parts)
        tmp = ""
        try:
            if self.local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                    if durable:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, target)
            else:
                self.fs.pipe_file(target, data)
        except OSError as e:
            if tmp:
                _unlink_quietly(tmp)  # a half-written temp file would hold the very space that ran out
            kind = out_of_space(e)
            if kind:
                raise full_error(f"cannot write {self.uri(*parts)}", describe_location(self, *parts), kind, e,
                                 "Nothing was replaced: the object keeps its previous content, if any.",
                                 "then re-run the same command", self.storage_options) from e
            if isinstance(e, PermissionError):  # an answer, not a fault: keep its type so nobody retries it
                raise PermissionError(e.errno, f"cannot write {self.uri(*parts)}: {e}") from e
            raise StorageError(f"cannot write {self.uri(*parts)}: {e}") from e

    @contextmanager
    def staged(self, *parts: str) -> Iterator[str]:
        """A local file for a streamed writer to write the object ``parts`` into; on a clean exit it replaces the
        object whole, as :meth:`write_bytes` does (local: fsync, then rename beside it; object stores: one upload,
        retried like every other write). On an error nothing is replaced; the temp file is always removed."""
        target = self.path(*parts)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        else:
            fd, tmp = tempfile.mkstemp(prefix="realfake-", suffix=f"-{posixpath.basename(target)}")
            os.close(fd)
        try:
            yield tmp
            if self.local:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            else:
                io_retry(lambda: self.fs.put_file(tmp, target), f"write {self.uri(*parts)}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), *parts)

    def read_table(self, *parts: str) -> pa.Table:
        return read_parquet(self.read_bytes(*parts))

    def write_table(self, table: pa.Table, *parts: str) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(buf.getvalue(), *parts)

    @contextmanager
    def open(self, *parts: str, mode: str = "rb") -> Iterator[IO[bytes]]:
        if "w" in mode and self.local:
            os.makedirs(os.path.dirname(self.path(*parts)), exist_ok=True)
        with self.fs.open(self.path(*parts), mode) as f:
            yield f

    def remove(self, *parts: str, recursive: bool = False) -> None:
        p = self.path(*parts)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=recursive)

    def local_path(self, *parts: str) -> str:
        """A local folder path for tools that need one (model ``save_pretrained``); local stores only."""
        if not self.local:
            raise StorageError(f"{self.uri(*parts)} is not on a local filesystem")
        return self.path(*parts)


# Retries: the one test of what a retry may cure, and the one policy.
def is_transient_io(e: BaseException) -> bool:
    """True for a storage fault a retry may cure (network, timeouts, throttling); False for answers (missing,
    exists, denied, a failed conditional write) and for a full disk or quota, which stay so until someone acts."""
    if isinstance(e, FileNotFoundError | FileExistsError | PermissionError | IsADirectoryError):
        return False
    if out_of_space(e):
        return False  # a full disk or an exhausted quota stays so until someone acts
    if isinstance(e, OSError) and e.errno == errno.EINVAL and "recondition" in str(e):
        return False  # a failed conditional write is an answer, not a fault
    return isinstance(e, OSError | TimeoutError | ConnectionError)


def _retry(fn: Callable[[], Any], what: str, attempts: int, backoff_s: float) -> Any:
    """Run ``fn``, retrying transient storage errors with exponential backoff.

    Non-transient errors (missing file, exists, permission) propagate unchanged; when the attempts run out the
    last error is raised as :class:`StorageError` naming ``what``.
    """
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not is_transient_io(e):
                raise
            if i == attempts - 1:
                raise StorageError(f"{what} failed after {attempts} attempts: {e}") from e
            log.warning("%s failed (%s), retry %d/%d", what, e, i + 1, attempts - 1)
            time.sleep(backoff_s * (2**i))
    raise AssertionError("unreachable")


# Every storage call of the library goes through `io_retry`: object stores fail single requests now and then (a 503
# on a HEAD carries no body, so s3fs cannot tell it is retryable), and a build must ride that out.
IO_ATTEMPTS = 6
IO_BACKOFF_S = 0.1


def io_retry(fn: Callable[[], Any], what: str) -> Any:
    """Run a storage call, retrying transient errors (IO_ATTEMPTS attempts, exponential backoff from IO_BACKOFF_S)."""
    return _retry(fn, what, IO_ATTEMPTS, IO_BACKOFF_S)


def read_parquet(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file held in memory, read whole on the calling thread.

    Not ``pq.read_table``: its thread-pool scan can release the Python-owned input buffer after returning, and
    one still doing so at interpreter exit aborts the process (``terminate called without an active exception``,
    exit 134; apache/arrow#33975), which made ``realfake verify`` report a good version as bad.
    """
    return pq.ParquetFile(pa.BufferReader(data), pre_buffer=False).read(columns=columns, use_threads=False)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _merged(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def resolve_storage_options(storage: StorageConfig | None, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec ``storage_options`` of a build: the ``storage`` section's connection settings (endpoint, region,
    addressing style, profile, CA bundle, further options) as s3fs takes them, under the caller's own options
    (a Prefect block, a test's), which win key by key. Empty when neither sets anything, so that fsspec's and
    botocore's own resolution from the environment (AWS_ENDPOINT_URL, FSSPEC_S3_*, AWS_PROFILE) applies as before.
    Resolving twice gives the same options.
    """
    out: dict[str, Any] = {}
    if storage is not None:
        client: dict[str, Any] = {}
        if storage.endpoint_url:
            out["endpoint_url"] = storage.endpoint_url
        if storage.region:
            client["region_name"] = storage.region
        if storage.ca_bundle:
            client["verify"] = storage.ca_bundle
        if client:
            out["client_kwargs"] = client
        if storage.addressing_style:
            out["config_kwargs"] = {"s3": {"addressing_style": storage.addressing_style}}
        if storage.profile:
            out["profile"] = storage.profile
        if storage.anon:
            out["anon"] = True
        out = _merged(out, storage.options)
    return _merged(out, given or {})


def dataset_store(root: str, dataset: str, storage_options: dict[str, Any] | None = None) -> Store:
    """The folder of a dataset, ``{root}/{dataset}``: its versions, ``latest.json`` and ``reports/``."""
    root = root.rstrip("/")
    if "://" not in root:
        root = os.path.abspath(os.path.expanduser(root))
    return Store(f"{root}/{dataset}", storage_options)


def version_store(root: str, dataset: str, version: str, storage_options: dict[str, Any] | None = None) -> Store:
    """The store of one dataset version: ``{root}/{dataset}/{version}``."""
    return dataset_store(root, dataset, storage_options).child(version)
