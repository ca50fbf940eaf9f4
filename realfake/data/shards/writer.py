"""The shard writer: one shard's files, its index part, then its commit record (:mod:`realfake.data.commit`).

:class:`ShardWriter` encodes the images of one shard, writes them as a WebDataset tar or a Parquet file, checks the
file landed whole (its size in storage), writes the shard's index part and only then its commit record
(``_commits/{name}.json``: count, bytes, sha256 of every file). Checksums are plain ``hashlib`` on the bytes in
hand as they are written: at SHA-256 speed that is a few milliseconds per thousand demo images, well under a
percent of the time it takes to generate them (``benchmarks/results/shard_io.md``). Object stores have no atomic
rename, so a remote shard is built in memory (or, above a size threshold, in a local spool file) and uploaded whole
(with retries). A write refused for lack of room removes what the shard had written and raises
:class:`~realfake.data.storage.StorageFullError` naming the file, the filesystem and the fix; committed shards are
untouched, and the re-run skips them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import socket
import tarfile
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from realfake.config import ShardConfig
from realfake.data.commit import read_record, write_record
from realfake.data.lease import LeaseLostError, VersionLease
from realfake.data.shards.parquet import ParquetPart
from realfake.data.shards.reader import verify_shard
from realfake.data.shards.records import (
    COMMITS_DIR,
    EXT,
    INDEX_PARTS_DIR,
    KEY_OK,
    NAME_OK,
    CommitRecord,
    IndexColumns,
    ShardExistsError,
    ShardFile,
    ShardIntegrityError,
    SyntheticRecord,
    encode_image,
    json_bytes,
    sample_json,
)
from realfake.data.shards.tar import TarPart
from realfake.data.storage import (
    Store,
    _retry,
    describe_location,
    full_error,
    io_retry,
    local_location,
    out_of_space,
)

__all__ = ["ShardWriter"]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # write buffer of a local shard file
_MEMORY_SPOOL = 256 << 20  # remote shards up to this size are built in memory and put in one request


class _Spool(io.RawIOBase):
    """Where a remote shard is built before its upload: memory up to ``memory_limit`` bytes, then a local file.

    A shard that fits in memory goes up in one ``put`` of the bytes already in hand (no disk write and read back);
    a larger one spills to a temp file in ``spool_dir`` and is uploaded from there. Either way the whole object
    is still in hand after the upload, so a failed request is retried without re-running the generator.
    """

    def __init__(self, memory_limit: int, spool_dir: str | None, label: str) -> None:
        self.memory_limit = memory_limit
        self.spool_dir = spool_dir
        self.label = label
        self._mem: io.BytesIO | None = io.BytesIO()
        self._file: IO[bytes] | None = None
        self.path = ""

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        try:
            if self._mem is not None and self._mem.tell() + len(b) > self.memory_limit:
                fd, self.path = tempfile.mkstemp(prefix="realfake-shard-", suffix=f"-{self.label}", dir=self.spool_dir)
                self._file = os.fdopen(fd, "wb")
                self._file.write(self._mem.getbuffer())
                self._mem = None
            return (self._mem if self._mem is not None else self._file).write(b)  # type: ignore[union-attr]
        except OSError as e:
            # A full local disk under a remote store: the message must name this folder, not the bucket.
            e.realfake_local_dir = self.spool_dir or tempfile.gettempdir()  # type: ignore[attr-defined]
            raise

    @property
    def in_memory(self) -> bool:
        return self._mem is not None

    def getvalue(self) -> bytes:
        assert self._mem is not None
        return self._mem.getvalue()

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
        super().close()

    def discard(self) -> None:
        """Close and delete whatever the spool holds."""
        try:
            self.close()
        except OSError:  # the spill file's last buffer cannot be flushed (disk full): it is deleted anyway
            pass
        self._mem = None
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)



@dataclass
class _Attempt:
    """What one :meth:`ShardWriter.write_shard` call has written so far, for its clean-up and error message."""

    rel: str  # the file being written now, relative to the shard folder
    written: list[str] = field(default_factory=list)  # files this call may have created (never a commit record)


def _local_dir(e: BaseException) -> str | None:
    """The local folder an error was met in, when a remote shard's local spool tagged it (see :class:`_Spool`)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        folder = getattr(e, "realfake_local_dir", None)
        if folder:
            return folder
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return None


class _Concurrent:
    """Runs ``fn`` on a thread of its own; :meth:`join` waits, ``error`` is what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.error: BaseException | None = None

        def run() -> None:
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the caller through .error
                self.error = e

        self._thread = threading.Thread(target=run, name="realfake-index-part", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


class ShardWriter:
    """Writes shards into ``{store}/{folder}`` under the commit protocol.

    Args:
        store: The version store.
        cfg: Container, image encoding and size limits.
        folder: Sub-folder of the version holding the shards.
        lease: When given, checked before every commit so a build that lost its lease stops writing.
        class_names: Class names by label; Parquet shards then type ``label`` as a ``ClassLabel``.
        retries: Attempts per storage operation (upload, index part, commit) on transient errors.
        backoff_s: First retry delay; doubles per attempt.
        spool_dir: Local folder for remote shards larger than ``memory_spool_bytes`` before upload (default: the
            system temp folder).
        durable: fsync local shard files, index parts and commit records before the commit is visible (survives
            a power loss, not only the death of the process). Object stores acknowledge a put once stored.
        memory_spool_bytes: Remote shards up to this size are built in memory and put in one request; larger
            ones spill to ``spool_dir``.
    """

    def __init__(
        self,
        store: Store,
        cfg: ShardConfig,
        folder: str = "synthetic",
        *,
        lease: VersionLease | None = None,
        class_names: Sequence[str] | None = None,
        retries: int = 5,
        backoff_s: float = 0.2,
        spool_dir: str | None = None,
        durable: bool = True,
        memory_spool_bytes: int = _MEMORY_SPOOL,
    ) -> None:
        self.store = store.child(folder)
        self.cfg = cfg
        self.folder = folder
        self.lease = lease
        self.class_names = list(class_names) if class_names else None
        self.retries = max(1, retries)
        self.backoff_s = backoff_s
        self.spool_dir = spool_dir
        self.durable = durable
        self.memory_spool_bytes = memory_spool_bytes
        self.writer_id = f"{socket.gethostname()}:{os.getpid()}"

    def _commit_path(self, name: str) -> tuple[str, str]:
        return COMMITS_DIR, f"{name}.json"

    def read_commit(self, name: str) -> CommitRecord | None:
        """The commit record of a shard, or None when it is not committed."""
        rel = self._commit_path(name)
        record = io_retry(lambda: read_record(self.store, *rel), f"read {self.store.uri(*rel)}")
        return None if record is None else CommitRecord.from_json(record)

    def is_committed(self, name: str, verify: bool = False) -> bool:
        """Whether ``name`` is committed; with ``verify`` its files are re-read and checked against the record."""
        commit = self.read_commit(name)
        if commit is None:
            return False
        if verify:
            problems = verify_shard(self.store, commit)
            if problems:
                log.warning("committed shard %s fails verification: %s", self.store.uri(name), "; ".join(problems))
                return False
        return True

    def _part_path(self, name: str, part: int) -> str:
        return f"{name}.{EXT[self.cfg.format]}" if part == 0 else f"{name}-{part}.{EXT[self.cfg.format]}"

    def _open_dest(self, rel: str) -> tuple[IO[bytes], str]:
        """Where a shard file is built: a temp file beside its target (local), or a :class:`_Spool` (remote)."""
        if self.store.local:
            target = self.store.path(rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            return open(tmp, "wb", buffering=_CHUNK), tmp  # noqa: SIM115 - closed by _publish / _discard
        return _Spool(self.memory_spool_bytes, self.spool_dir, os.path.basename(rel)), ""

    @staticmethod
    def _discard(dest: IO[bytes], tmp: str) -> None:
        if isinstance(dest, _Spool):
            dest.discard()
        else:
            try:
                dest.close()
            except OSError:  # its last buffer cannot be flushed (disk full): the file goes anyway
                pass
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)

    def _publish(self, dest: IO[bytes], tmp: str, rel: str, nbytes: int) -> None:
        """Move a finished file to its place in the store and check it landed whole."""
        if self.store.local:
            dest.flush()
            if self.durable:
                os.fsync(dest.fileno())
            dest.close()
            os.replace(tmp, self.store.path(rel))
            size = os.path.getsize(self.store.path(rel))
        else:
            assert isinstance(dest, _Spool)
            path = self.store.path(rel)
            if dest.in_memory:
                data = dest.getvalue()
                upload = lambda: self.store.fs.pipe_file(path, data)  # noqa: E731
            else:
                dest.close()
                upload = lambda: self.store.fs.put_file(dest.path, path)  # noqa: E731
            _retry(upload, f"upload {self.store.uri(rel)}", self.retries, self.backoff_s)
            self.store.fs.invalidate_cache(path)
            # The object store computed nothing we can trust about what it kept: ask for the size it holds.
            size = _retry(lambda: self.store.size(rel), f"stat {self.store.uri(rel)}", self.retries, self.backoff_s)
        if size != nbytes:
            raise ShardIntegrityError(f"{self.store.uri(rel)} has {size} bytes after writing {nbytes}; not committed")

    def write_shard(self, name: str, records: Iterable[SyntheticRecord], replace: bool = False) -> CommitRecord:
        """Write one shard and commit it (commit record last).

        Each file's sha256 and every image's sha256 are computed from the very bytes written, as they are
        written; after the upload the stored size is checked against the bytes written. Only then are the
        index part and, last, the commit record written. When anything fails before the commit, the files this
        call wrote are removed (best effort; :func:`plan_pending` removes whatever is left on the next run).

        Args:
            name: Shard name (a :class:`ShardPlan` name); letters, digits, '_' and '-'.
            records: The shard's records, consumed once (a generator is fine: retries never re-read it).
            replace: Rewrite a shard that is already committed (only for a shard that failed verification).

        Returns:
            The commit record.

        Raises:
            ShardExistsError: The shard is committed and ``replace`` is False.
            LeaseLostError: The writer's lease was taken over by another build.
            StorageFullError: No room for the shard (disk full, quota, file or object size limit); the message
                names the file, the filesystem and what to do. Nothing of the shard is committed.
            StorageError: Storage kept failing after the retries.
        """
        if not NAME_OK.match(name):
            raise ValueError(f"shard name {name!r} must be letters, digits, '_' or '-' (no dots)")
        if not replace and self.read_commit(name) is not None:
            raise ShardExistsError(f"shard {self.store.uri(name)} is already committed; skip it or pass replace=True")
        if self.lease is not None:
            self.lease.check()
        attempt = _Attempt(self._part_path(name, 0))
        try:
            return self._write(name, records, attempt)
        except LeaseLostError:
            raise  # the version belongs to another build now: files under these names are not ours to remove
        except BaseException as e:
            self._remove_uncommitted(name, attempt.written)
            kind = out_of_space(e)
            if kind is None:
                raise
            spool = _local_dir(e)
            where = local_location(spool) + " (the local spool folder)" if spool else describe_location(
                self.store, attempt.rel)
            raise full_error(
                f"cannot write shard {name} ({self.store.uri(attempt.rel)})", where, kind, e,
                f"Shard {name} was not committed and the files it had written were removed; shards committed "
                "earlier are intact.",
                "then re-run the same command: committed shards are kept and skipped",
                self.store.storage_options,
            ) from e

    def _remove_uncommitted(self, name: str, written: list[str]) -> None:
        """Remove the files a failed :meth:`write_shard` wrote, unless its commit landed after all."""
        if not written:
            return
        try:
            if self.read_commit(name) is not None:
                return  # a commit whose answer was lost, or the shard being replaced: its files stay
        except Exception as e:  # noqa: BLE001 - cannot tell: leave the files to plan_pending's clean-up
            log.warning("not removing the files of failed shard %s: %s", self.store.uri(name), e)
            return
        for rel in written:
            try:
                self.store.remove(rel)
            except Exception as e:  # noqa: BLE001 - best effort: plan_pending removes leftovers on the next run
                log.warning("could not remove %s of uncommitted shard %s: %s", self.store.uri(rel), name, e)

    def _write(self, name: str, records: Iterable[SyntheticRecord], attempt: _Attempt) -> CommitRecord:
        """The body of :meth:`write_shard`; records in ``attempt`` what it writes, for the clean-up."""
        fmt, ext = self.cfg.format, self.cfg.image_format
        part_cls = TarPart if fmt == "webdataset" else ParquetPart
        files: list[ShardFile] = []
        cols = IndexColumns()
        seen: set[str] = set()
        labels: Counter[int] = Counter()
        part: TarPart | ParquetPart | None = None
        dest: IO[bytes] | None = None
        part_no, part_bytes, tmp, part_rel = 0, 0, "", ""
        # A tar ends with zero blocks padded to tarfile's 10 KiB record; reserve them so files stay under max_bytes.
        trailer = tarfile.RECORDSIZE if fmt == "webdataset" else 1024

        index_rel = f"{INDEX_PARTS_DIR}/{name}.parquet"
        write_part = lambda data: _retry(  # noqa: E731
            lambda: self.store.write_bytes(data, index_rel, durable=self.durable),
            f"write {self.store.uri(index_rel)}", self.retries, self.backoff_s)
        index_data = b""

        def close_part(last: bool = False) -> None:
            """Finish, publish and check the open file. After the last one the shard's index part is known: on an
            object store it goes up while the file does (two requests in flight instead of one after the other)."""
            nonlocal part, dest, part_no, index_data
            assert part is not None and dest is not None
            done, out, part, dest = part, dest, None, None  # the error path must not close them twice
            attempt.rel = part_rel
            attempt.written.append(part_rel)  # before publishing: a file moved in place but not verified is ours too
            side: _Concurrent | None = None
            try:
                nbytes, sha, digests = done.close()
                cols.cols["image_sha256"] += digests
                if last:
                    index_data = _table_bytes(cols.table())
                    attempt.written.append(index_rel)
                    if not self.store.local:
                        side = _Concurrent(lambda: write_part(index_data))
                self._publish(out, tmp, part_rel, nbytes)
            finally:
                if side is not None:
                    side.join()  # before any clean-up: no request of this shard may land after it
                self._discard(out, tmp)
            if side is not None and side.error is not None:
                attempt.rel = index_rel
                raise side.error
            files.append(ShardFile(path=part_rel, count=done.count, bytes=nbytes, sha256=sha))
            part_no += 1
            if last and self.store.local:
                attempt.rel = index_rel
                write_part(index_data)

        try:
            for rec in records:
                if not KEY_OK.match(rec.key):
                    raise ValueError(
                        f"record key {rec.key!r} in shard {name} must be letters, digits, '_' or '-' "
                        "(no dots: WebDataset splits keys at the first dot); use make_key()"
                    )
                if rec.key in seen:
                    raise ValueError(f"duplicate record key {rec.key!r} in shard {name}")
                seen.add(rec.key)
                image = encode_image(rec.image, ext, self.cfg.jpeg_quality)
                meta_json = json_bytes(sample_json(rec))
                cost = part_cls.cost(image, meta_json)
                if part is not None and part.count and part_bytes + cost + trailer > self.cfg.max_bytes:
                    close_part()
                if part is None:
                    part_rel = attempt.rel = self._part_path(name, part_no)
                    dest, tmp = self._open_dest(part_rel)
                    part = TarPart(dest) if fmt == "webdataset" else \
                        ParquetPart(dest, self.class_names, cols, len(cols.cols["key"]), ext)
                    part_bytes = 0
                label = int(rec.label)
                cols.add(rec, name, part_rel, ext, len(image), meta_json.decode())
                if isinstance(part, TarPart):
                    part.add(rec.key, label, image, ext, meta_json)
                else:
                    part.add(image)
                part_bytes += cost
                labels[label] += 1
            if part is None:
                raise ValueError(f"shard {name} has no records; plan_shards never makes an empty shard")
            close_part(last=True)
        except BaseException:
            if part is not None:
                part.abandon()
            if dest is not None:
                self._discard(dest, tmp)
            raise

        commit = CommitRecord(
            name=name,
            format=fmt,
            image_format=ext,
            files=tuple(files),
            class_counts=dict(sorted(labels.items())),
            index_part=index_rel,
            index_sha256=hashlib.sha256(index_data).hexdigest(),
            committed_at=datetime.now(UTC).isoformat(timespec="seconds"),
            writer=self.writer_id,
        )
        if self.lease is not None:
            self.lease.check()  # fencing: a build that lost the version must not publish a commit
        attempt.rel = posixpath.join(*self._commit_path(name))
        write_record(self.store, commit.to_json(), *self._commit_path(name), durable=self.durable, indent=1)
        return commit
