"""Storage: one dataset version under one fsspec URI.

Every stage reads and writes through a :class:`Store` rooted at ``{root}/{dataset}/{version}``, so the
same code runs on a laptop folder (``./out``, ``file://``) and on object storage (``s3://bucket/prefix``).
Object stores have no atomic rename, so small records are written whole in one ``put`` and large ones
follow the shard commit protocol (:mod:`realfake.data.shards`): write, verify, then commit.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["Store", "StorageError", "version_store"]


class StorageError(OSError):
    """A read or write on the dataset store failed; the message names the URI."""


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
    def read_bytes(self, *parts: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(*parts))
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
            raise StorageError(f"cannot write {self.uri(*parts)}: {e}") from e

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), *parts)

    def read_table(self, *parts: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(*parts)))

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


def version_store(root: str, dataset: str, version: str, storage_options: dict[str, Any] | None = None) -> Store:
    """The store of one dataset version: ``{root}/{dataset}/{version}``."""
    root = root.rstrip("/")
    if "://" not in root:
        root = os.path.abspath(os.path.expanduser(root))
    return Store(f"{root}/{dataset}/{version}", storage_options)
