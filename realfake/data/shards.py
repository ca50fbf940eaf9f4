"""Synthetic-image shards: writers, readers, the commit protocol, the version lease and the index.

A shard is the unit of work, retry and resume. :class:`ShardWriter` encodes the images of one
:class:`ShardPlan`, writes them as a WebDataset tar (``{key}.jpg|png|webp`` + ``{key}.cls`` + ``{key}.json``)
or a Parquet file (the Hugging Face ``Image`` struct plus provenance columns and the ``huggingface`` schema
metadata), checks the object landed whole, writes the shard's index rows, and only then writes its commit
record (``_commits/{name}.json``: count, bytes, sha256 of every file). Readers look only at committed
shards, so a shard truncated by a crash is never read as data; a re-run skips committed shards and rewrites
the rest, which costs a killed worker at most its open shard. Object stores have no atomic rename, so a remote
shard is built in memory (or, above a size threshold, in a local spool file) and uploaded whole (with retries),
and a :class:`VersionLease` (exclusive create, heartbeat, stale detection) keeps two builds of one version from
clobbering each other. A write refused for lack of room (a full disk, a quota, a file-size limit) removes what the
shard had written and raises :class:`~realfake.data.storage.StorageFullError` naming the file, the filesystem and the
fix; committed shards are untouched, and the re-run skips them. Checksums are computed once, from the bytes as
they are written or read, on a helper thread, so the protocol costs little over writing the same bytes with
``tarfile`` or pyarrow directly.
Every byte written derives from the records alone (fixed tar headers, sorted JSON), so the same plan gives
the same files whatever the number or order of workers. The recipe the shards are made under is recorded beside
them (``_recipe.json``, by :func:`plan_pending`) before the first one, and committed shards made under another
are never resumed or extended.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import io
import json
import logging
import os
import posixpath
import queue
import re
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from realfake.config import ShardConfig
from realfake.data.storage import (
    StorageError,
    Store,
    _retry,
    describe_location,
    full_error,
    io_retry,
    local_location,
    out_of_space,
)
from realfake.recipe import RecipeMismatchError, canonical, mismatch_message, recipe_bytes, recipe_diff

__all__ = [
    "COMMITS_DIR",
    "INDEX_FILE",
    "INDEX_PARTS_DIR",
    "INDEX_SCHEMA",
    "LEASE_FILE",
    "RECIPE_FILE",
    "WDS_INFO_FILE",
    "WDS_SPLIT",
    "CommitRecord",
    "LeaseHeldError",
    "LeaseLostError",
    "ShardExistsError",
    "ShardFile",
    "ShardIntegrityError",
    "ShardPlan",
    "ShardSample",
    "ShardWriter",
    "SyntheticRecord",
    "VersionLease",
    "committed_keys",
    "committed_shards",
    "encode_image",
    "check_file_size",
    "iter_shard",
    "io_retry",
    "iter_synthetic",
    "make_key",
    "partial_shards",
    "plan_pending",
    "plan_shards",
    "read_index",
    "read_recipe",
    "remove_partial_shards",
    "verify_shard",
    "write_index",
    "write_wds_info",
]

log = logging.getLogger(__name__)

COMMITS_DIR = "_commits"
INDEX_PARTS_DIR = "_index"
INDEX_FILE = "index.parquet"
WDS_INFO_FILE = "_info.json"
LEASE_FILE = "_lease.json"
RECIPE_FILE = "_recipe.json"  # in the shard folder: the recipe every committed shard of the version was made under
WDS_SPLIT = "train"  # synthetic data is training data; timm's `wds/` reader defaults to split "train"
_EXT = {"webdataset": "tar", "parquet": "parquet"}
_IMAGE_EXTS = ("jpg", "png", "webp")
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_KEY_OK = re.compile(r"^[A-Za-z0-9_-]+$")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_TAR_MTIME = 946684800  # 2000-01-01: fixed so that identical records give byte-identical tars
_CHUNK = 1 << 20
_CHECKSUM_QUEUE = 16  # batches in flight to the checksum thread (~1 MB of stream or 64 images each): bounds memory
_MEMORY_SPOOL = 256 << 20  # remote shards up to this size are built in memory and put in one request
_PARQUET_ROW_GROUP = 64  # images per row group: small groups keep `datasets` streaming reads light
_PARQUET_LAG = 4  # row groups held back for their image digests before writing (twice that: wait for them)
_HASH_BATCH = 64  # images per hand-off to the checksum thread

# Provenance fields pulled out of ``SyntheticRecord.meta`` into typed columns; the whole dict is kept too.
INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("file", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("source_sample_id", pa.string()),
        ("replica", pa.int32()),
        ("seed", pa.int64()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("sampler", pa.string()),
        ("base_model", pa.string()),
        ("base_model_hash", pa.string()),
        ("adapter_hash", pa.string()),
        ("image_format", pa.string()),
        ("image_bytes", pa.int64()),
        ("image_sha256", pa.string()),
        ("meta", pa.string()),
    ]
)


# --------------------------------------------------------------------------------------------------------
# Records, plans, commit records
# --------------------------------------------------------------------------------------------------------
@dataclass
class SyntheticRecord:
    """One synthetic image ready to be written.

    Attributes:
        key: Unique sample key without dots or slashes (see :func:`make_key`).
        label: Class index.
        class_name: Human-readable class name.
        image: The image, or bytes already encoded in the writer's ``image_format``.
        meta: JSON-serialisable provenance: ``source_sample_id``, ``replica``, ``prompt``, ``negative_prompt``,
            ``seed``, ``sampler`` (settings dict), ``base_model``, ``base_model_hash``, ``adapter_hash`` and
            anything else worth keeping.
    """

    key: str
    label: int
    class_name: str
    image: Image.Image | bytes
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardPlan:
    """One shard to produce: its name, its position and the caller's opaque work items."""

    name: str
    index: int
    items: tuple


@dataclass(frozen=True)
class ShardFile:
    """One file of a committed shard (a shard spans several files only when ``max_bytes`` splits it)."""

    path: str
    count: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class CommitRecord:
    """The commit record of a shard: it exists only once every file and the index part are written."""

    name: str
    format: str
    image_format: str
    files: tuple[ShardFile, ...]
    class_counts: dict[int, int]
    index_part: str
    index_sha256: str
    committed_at: str = ""
    writer: str = ""

    @property
    def count(self) -> int:
        return sum(f.count for f in self.files)

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def sha256(self) -> str:
        """The file's sha256, or for a multi-file shard the sha256 of its files' digests in order."""
        if len(self.files) == 1:
            return self.files[0].sha256
        return hashlib.sha256("".join(f.sha256 for f in self.files).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = [asdict(f) for f in self.files]
        d["class_counts"] = {str(k): v for k, v in sorted(self.class_counts.items())}
        d.update(count=self.count, bytes=self.bytes, sha256=self.sha256)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CommitRecord:
        return cls(
            name=d["name"],
            format=d["format"],
            image_format=d["image_format"],
            files=tuple(ShardFile(**f) for f in d["files"]),
            class_counts={int(k): int(v) for k, v in d["class_counts"].items()},
            index_part=d["index_part"],
            index_sha256=d["index_sha256"],
            committed_at=d.get("committed_at", ""),
            writer=d.get("writer", ""),
        )


@dataclass
class ShardSample:
    """One sample read back from a shard, image still encoded."""

    key: str
    label: int
    image: bytes
    image_format: str
    meta: dict[str, Any]


class ShardIntegrityError(StorageError):
    """A committed shard does not match its commit record (size, checksum, count or content)."""


class ShardExistsError(StorageError):
    """A shard is already committed and the write would replace it."""


class LeaseHeldError(RuntimeError):
    """Another build holds the version's lease."""


class LeaseLostError(RuntimeError):
    """This build's lease was taken over (it expired or was broken); stop writing."""


def make_key(label: int, source_sample_id: str, replica: int) -> str:
    """A WebDataset-safe sample key ``{label:04d}_{source}_{replica}``.

    Characters other than letters, digits, ``_`` and ``-`` become ``-``; when that changes the source id a short
    hash of the original is appended, so two distinct ids never collide after sanitising.
    """
    clean = re.sub(r"[^A-Za-z0-9_-]", "-", str(source_sample_id))
    if clean != str(source_sample_id):
        clean = f"{clean}-{hashlib.sha256(str(source_sample_id).encode()).hexdigest()[:8]}"
    return f"{int(label):04d}_{clean}_{int(replica)}"


def plan_shards(items: Sequence, max_count: int, prefix: str = "shard", start: int = 0) -> list[ShardPlan]:
    """Cut ``items`` (in the given order) into consecutive shards of at most ``max_count`` items.

    Deterministic: the plan depends on the items and ``max_count`` only, never on workers. ``start`` numbers the
    first shard (used when extending a version after its last shard).
    """
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if not _NAME_OK.match(prefix):
        raise ValueError(f"shard prefix {prefix!r} must be letters, digits, '_' or '-' (no dots)")
    items = tuple(items)
    return [
        ShardPlan(name=f"{prefix}-{start + i:06d}", index=start + i, items=items[j : j + max_count])
        for i, j in enumerate(range(0, len(items), max_count))
    ]


# --------------------------------------------------------------------------------------------------------
# Encoding and the container writers
# --------------------------------------------------------------------------------------------------------
_MAGIC = {"jpg": (b"\xff\xd8\xff",), "png": (b"\x89PNG\r\n\x1a\n",), "webp": (b"RIFF",)}


def encode_image(image: Image.Image | bytes, image_format: str, quality: int = 95) -> bytes:
    """Encode an image as ``jpg`` / ``png`` / ``webp``; bytes are checked to already be in that format."""
    if image_format not in _PIL_FORMAT:
        raise ValueError(f"image_format must be one of {list(_PIL_FORMAT)}, got {image_format!r}")
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        if not data.startswith(_MAGIC[image_format]) or (image_format == "webp" and data[8:12] != b"WEBP"):
            raise ValueError(f"pre-encoded image bytes are not {image_format} (check ShardConfig.image_format)")
        return data
    img = image
    if image_format == "jpg" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    elif image_format == "webp" and img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA" if "A" in img.mode else "RGB")
    buf = io.BytesIO()
    if image_format == "png":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format=_PIL_FORMAT[image_format], quality=quality)
    return buf.getvalue()


class _Checksummer:
    """Writes a byte stream to its destination on the caller's thread and hashes it, plus images, on helpers.

    Checksums are part of the contract (per image for the index, per file for the commit record); at SHA-256
    speed (~2 GB/s a core) they cost about as much CPU as building the container. The caller's thread writes
    (the file write, like hashlib on large buffers, releases the GIL) while two helper threads hash, one the
    stream and one the images, so the hashing overlaps with building the container instead of adding to it, and
    the image digests a Parquet row group waits for never queue behind the stream's hashing. Work goes to the
    helpers in batches of about ``_CHUNK`` bytes (stream pieces) or of whole image lists, so the per-item cost
    of the hand-off stays out of the per-image path. The queues are bounded, so a slow hash slows the producer
    instead of holding a whole shard in memory.

    Args:
        dest: Where the stream goes (a local file or an in-memory spool); None only hashes (readers).
    """

    def __init__(self, dest: IO[bytes] | None) -> None:
        self.dest = dest
        self.nbytes = 0
        self.abandoned = False
        self._sha = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._images: list[bytes] = []  # images not yet handed to the image thread
        self._digests: list[str] = []  # image digests in submission order, appended by the image thread
        self._done = threading.Condition()
        self._error: BaseException | None = None
        self._lanes: dict[str, tuple[queue.Queue, threading.Thread]] = {}
        self._lane("stream")

    def _lane(self, kind: str) -> queue.Queue:
        """The queue of one helper thread (``stream`` or ``images``), started on first use."""
        if kind not in self._lanes:
            q: queue.Queue = queue.Queue(maxsize=_CHECKSUM_QUEUE)
            t = threading.Thread(target=self._run, args=(q,), name=f"realfake-checksum-{kind}", daemon=True)
            self._lanes[kind] = (q, t)
            t.start()
        return self._lanes[kind][0]

    def _run(self, q: queue.Queue) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            kind, pieces = item
            try:
                if self._error is not None:
                    continue
                if kind == "stream":
                    for piece in pieces:
                        self._sha.update(piece)
                else:
                    digests = [hashlib.sha256(b).hexdigest() for b in pieces]
                    with self._done:
                        self._digests += digests
                        self._done.notify_all()
            except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
                with self._done:
                    self._error = self._error or e
                    self._done.notify_all()

    def _put(self, item: tuple[str, list]) -> None:
        if self._error is not None:
            raise self._error
        self._lane(item[0]).put(item)

    def _stop(self) -> None:
        for q, t in self._lanes.values():
            if t.is_alive():
                q.put(None)
        for _, t in self._lanes.values():
            t.join()

    def write(self, piece: bytes) -> None:
        """Append ``piece`` (immutable bytes) to the stream: written now, hashed later on the stream thread."""
        if self._error is not None:
            raise self._error
        if self.dest is not None:
            self.dest.write(piece)
        n = len(piece)
        self.nbytes += n
        self._pending.append(piece)
        self._pending_bytes += n
        if self._pending_bytes >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        """Hand the stream pieces written so far to the stream thread."""
        if self._pending:
            pieces, self._pending, self._pending_bytes = self._pending, [], 0
            self._put(("stream", pieces))

    def hash_image(self, image: bytes) -> None:
        """Queue the sha256 of ``image`` (immutable bytes) for :meth:`digests`; images go to the image thread
        ``_HASH_BATCH`` at a time."""
        self._images.append(image)
        if len(self._images) >= _HASH_BATCH:
            self._flush_images()

    def _flush_images(self) -> None:
        if self._images:
            images, self._images = self._images, []
            self._put(("images", images))

    @property
    def ready(self) -> int:
        """How many image digests are done."""
        return len(self._digests)

    def digests(self, upto: int) -> list[str]:
        """The first ``upto`` image digests, waiting for the image thread; raises what a helper met."""
        self._flush_images()  # a partial batch the caller waits for
        lane = self._lanes.get("images")
        with self._done:
            while len(self._digests) < upto and self._error is None and lane is not None and lane[1].is_alive():
                self._done.wait(timeout=1.0)
        if len(self._digests) < upto:
            raise self._error or StorageError("checksum thread stopped before hashing every image")
        return self._digests[:upto]

    def close(self) -> tuple[int, str]:
        """Finish the stream: returns its byte count and sha256; raises what a helper thread met."""
        self.flush()
        self._stop()
        if self._error is not None:
            raise self._error
        return self.nbytes, self._sha.hexdigest()

    def abandon(self) -> None:
        """Stop the helper threads on an error path, dropping what they had not done yet."""
        self.abandoned = True
        self._error = self._error or StorageError("checksum stream abandoned")
        self._pending, self._images = [], []
        self._stop()


class _ChecksumWriter(io.RawIOBase):
    """A write-only file handing pyarrow's output to a :class:`_Checksummer` (written at once, hashed later)."""

    def __init__(self, sums: _Checksummer) -> None:
        self.sums = sums

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        # pyarrow hands over immutable bytes; anything else is copied, since the hash runs after write() returns
        data = b if isinstance(b, bytes) else bytes(b)
        if not self.sums.abandoned:  # else the shard is being thrown away: pyarrow's closing writes go nowhere
            self.sums.write(data)
        return len(data)

    def tell(self) -> int:
        return self.sums.nbytes

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


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sample_json(rec: SyntheticRecord) -> dict[str, Any]:
    return {**rec.meta, "key": rec.key, "label": int(rec.label), "class_name": rec.class_name}


def _ustar_fields() -> tuple[bytes, bytes, bytes, int]:
    """The constant parts of the ustar header of a regular member with our fixed metadata, and their byte sum."""
    mode_ids = b"%07o\0" % 0o644 + b"%07o\0" % 0 + b"%07o\0" % 0  # mode, uid, gid
    mtime = b"%011o\0" % _TAR_MTIME
    tail = tarfile.REGTYPE + b"\0" * 100 + tarfile.POSIX_MAGIC + b"\0" * (32 + 32 + 8 + 8 + 155 + 12)
    return mode_ids, mtime, tail, sum(mode_ids) + sum(mtime) + sum(tail) + 8 * ord(" ")


_USTAR_MODE_IDS, _USTAR_MTIME, _USTAR_TAIL, _USTAR_CONST_SUM = _ustar_fields()
_TAR_MAX_SIZE = 8**11  # ustar's 11 octal digits; larger members need tarfile's PAX headers


def _tar_header(name: str, size: int) -> bytes:
    """The header tarfile writes for a regular member ``name`` of ``size`` bytes with our fixed metadata.

    Byte for byte what ``TarInfo.tobuf(PAX_FORMAT)`` gives (a plain ustar block when the name is ASCII and at most
    100 bytes), built without tarfile's generic per-field machinery, which costs more than hashing the payload.
    """
    raw = name.encode("ascii", "replace")
    if len(raw) > 100 or size >= _TAR_MAX_SIZE or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, _TAR_MTIME, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    name_f = raw + b"\0" * (100 - len(raw))
    size_f = b"%011o\0" % size
    chksum = _USTAR_CONST_SUM + sum(name_f) + sum(size_f)
    return b"".join((name_f, _USTAR_MODE_IDS, size_f, _USTAR_MTIME, b"%06o\0 " % chksum, _USTAR_TAIL))


def _tar_pad(n: int) -> bytes:
    return b"\0" * (-n % tarfile.BLOCKSIZE)


class _TarPart:
    """One WebDataset tar being written to ``dest`` (a local file or a :class:`_Spool`).

    Each sample (three members) goes to the checksum stream as three pieces (the image's header, the image, the
    rest), its image to the per-image hashing in batches; the archive is byte-identical to what ``tarfile``
    writes for the same members (tested).
    """

    def __init__(self, dest: IO[bytes]) -> None:
        self.sums = _Checksummer(dest)
        self.count = 0

    def add(self, key: str, label: int, image: bytes, ext: str, meta_json: bytes) -> None:
        """Append one sample."""
        cls = b"%d" % label
        write = self.sums.write
        write(_tar_header(f"{key}.{ext}", len(image)))
        write(image)
        write(b"".join((
            _tar_pad(len(image)),
            _tar_header(f"{key}.cls", len(cls)), cls, _tar_pad(len(cls)),
            _tar_header(f"{key}.json", len(meta_json)), meta_json, _tar_pad(len(meta_json)),
        )))
        self.sums.hash_image(image)
        self.count += 1

    @staticmethod
    def cost(image: bytes, meta_json: bytes) -> int:
        """Bytes a sample adds: three 512-byte headers (+ PAX slack) and padded payloads."""
        pad = lambda n: (n + 511) // 512 * 512  # noqa: E731
        return 3 * 512 + pad(len(image)) + 512 + pad(len(meta_json)) + 1024

    def close(self) -> tuple[int, str, list[str]]:
        """Finish the tar as tarfile does (two zero blocks, then zeros up to a whole record); returns its byte
        count, its sha256 and its images' sha256 once every byte is in ``dest``."""
        end = 2 * tarfile.BLOCKSIZE
        self.sums.write(b"\0" * (end + (-(self.sums.nbytes + end) % tarfile.RECORDSIZE)))
        digests = self.sums.digests(self.count)
        return (*self.sums.close(), digests)

    def abandon(self) -> None:
        self.sums.abandon()

def _hf_features(class_names: Sequence[str] | None) -> dict[str, Any]:
    label: dict[str, Any] = (
        {"_type": "ClassLabel", "names": list(class_names)} if class_names else {"_type": "Value", "dtype": "int64"}
    )
    string = {"_type": "Value", "dtype": "string"}
    return {
        "image": {"_type": "Image"},
        "label": label,
        "key": string,
        "class_name": string,
        "source_sample_id": string,
        "replica": {"_type": "Value", "dtype": "int32"},
        "seed": {"_type": "Value", "dtype": "int64"},
        "prompt": string,
        "negative_prompt": string,
        "image_sha256": string,
        "meta": string,
    }


def _parquet_schema(class_names: Sequence[str] | None) -> pa.Schema:
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("label", pa.int64()),
            ("key", pa.string()),
            ("class_name", pa.string()),
            ("source_sample_id", pa.string()),
            ("replica", pa.int32()),
            ("seed", pa.int64()),
            ("prompt", pa.string()),
            ("negative_prompt", pa.string()),
            ("image_sha256", pa.string()),
            ("meta", pa.string()),
        ]
    )
    # `datasets` restores typed features (Image, ClassLabel) from this exact metadata key.
    hf = {"info": {"features": _hf_features(class_names)}}
    return schema.with_metadata({b"huggingface": json.dumps(hf).encode()})


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)


class _ParquetPart:
    """One Parquet shard being written to ``dest`` (a local file or a :class:`_Spool`), in small row groups.

    Rows carry their image's sha256, computed on the checksum thread: row groups are written a few groups late,
    once their digests are in, so the writer rarely waits for the hashing; pyarrow's output goes through the same
    thread's stream hash to ``dest``. The provenance columns come from the shard's :class:`_IndexColumns`
    (rows ``start`` on), the lists the index part is built from.
    """

    def __init__(self, dest: IO[bytes], class_names: Sequence[str] | None, cols: _IndexColumns, start: int,
                 ext: str) -> None:
        self.sums = _Checksummer(dest)
        self.schema = _parquet_schema(class_names)
        self.cols, self.start, self.ext = cols, start, ext
        # Images are already compressed: compressing them again costs CPU and saves nothing.
        compression = {name: "zstd" for name in self.schema.names}
        compression.update({"image.bytes": "none", "image.path": "zstd"})
        # Every image is unique, so dictionary-encoding them only hashes megabytes to give up at the page limit.
        dictionary = [name for name in self.schema.names if name != "image"] + ["image.path"]
        self.sink = _ChecksumWriter(self.sums)
        self.writer = pq.ParquetWriter(
            self.sink,
            self.schema,
            compression=compression,
            use_dictionary=dictionary,
            write_statistics=False,
        )
        self.images: list[bytes] = []  # rows written..count-1, not yet in the file
        self.written = 0
        self.count = 0

    def add(self, image: bytes) -> None:
        """Append the row of the image whose index columns were just added to ``cols``."""
        self.images.append(image)
        self.sums.hash_image(image)
        self.count += 1
        if self.count % _PARQUET_ROW_GROUP == 0:
            self._write_ready()

    @staticmethod
    def cost(image: bytes, meta_json: bytes) -> int:
        return len(image) + len(meta_json) + 256

    def _write_ready(self) -> None:
        """Write the whole row groups whose digests are in, once a few are pending (waits only when many are)."""
        group = _PARQUET_ROW_GROUP
        pending = self.count - self.written
        if pending < _PARQUET_LAG * group:
            return
        ready = (min(self.sums.ready, self.count) - self.written) // group * group
        if ready == 0 and pending >= 2 * _PARQUET_LAG * group:
            ready = group  # the hashing fell behind: wait for one group rather than hold more images
        if ready:
            self._write_rows(ready)

    def _write_rows(self, n: int) -> None:
        a = self.start + self.written
        b = a + n
        c = self.cols.cols
        shas = self.sums.digests(self.written + n)[self.written:]
        keys = c["key"][a:b]
        image = pa.StructArray.from_arrays(
            [pa.array(self.images[:n], pa.binary()), pa.array([f"{k}.{self.ext}" for k in keys], pa.string())],
            fields=list(self.schema.field("image").type),
        )
        values = (c["label"][a:b], keys, c["class_name"][a:b], c["source_sample_id"][a:b], c["replica"][a:b],
                  c["seed"][a:b], c["prompt"][a:b], c["negative_prompt"][a:b], shas, c["meta"][a:b])
        arrays = [image] + [pa.array(v, self.schema.field(i).type) for i, v in enumerate(values, start=1)]
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema), row_group_size=_PARQUET_ROW_GROUP)
        del self.images[:n]
        self.written += n

    def close(self) -> tuple[int, str, list[str]]:
        """Finish the file; returns its byte count, sha256 and its images' sha256 once every byte is in ``dest``."""
        if self.count > self.written:
            self._write_rows(self.count - self.written)
        self.writer.close()
        digests = self.sums.digests(self.count)
        return (*self.sums.close(), digests)

    def abandon(self) -> None:
        self.sums.abandon()
        try:
            self.writer.close()  # now, quietly, rather than from the garbage collector
        except Exception as e:  # noqa: BLE001 - the shard is discarded; the original error is what matters
            log.debug("closing an abandoned Parquet writer: %s", e)

# --------------------------------------------------------------------------------------------------------
# Version lease
# --------------------------------------------------------------------------------------------------------
def _now() -> float:
    return time.time()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create_exclusive(store: Store, data: bytes, *parts: str) -> bool:
    """Create an object only if absent; False if it exists. Local: O_EXCL; S3: ``If-None-Match: *``."""
    target = store.path(*parts)
    if store.local:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    try:
        io_retry(lambda: store.fs.pipe_file(target, data, mode="create"), f"create {store.uri(*parts)}")
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno == errno.EINVAL and "recondition" in str(e):
            return False
        raise
    except TypeError:
        # A filesystem without exclusive create: check, write, then confirm our token survived.
        if io_retry(lambda: store.fs.exists(target), f"stat {store.uri(*parts)}"):
            return False
        io_retry(lambda: store.fs.pipe_file(target, data), f"write {store.uri(*parts)}")
        return io_retry(lambda: store.fs.cat_file(target), f"read {store.uri(*parts)}") == data


class VersionLease:
    """An exclusive, expiring lease on a dataset version, held by one build (all of its workers).

    Workers of the same build pass the same ``owner`` and share the lease; any other owner gets
    :class:`LeaseHeldError` (after waiting up to ``wait_s``) naming who holds it. A background thread renews the
    lease every ``ttl_s / 3``; a lease is stale when it has expired, or when it was taken on this host by a
    process that no longer exists (a killed build), and a stale lease is taken over.

    Args:
        store: The version store.
        owner: Build id shared by the workers of one build; defaults to a fresh id.
        ttl_s: Seconds a lease stays valid without renewal.
        heartbeat: Renew in a background thread while held.
    """

    def __init__(self, store: Store, owner: str | None = None, ttl_s: float = 300.0, heartbeat: bool = True) -> None:
        self.store = store
        self.owner = owner or f"build-{uuid.uuid4().hex[:12]}"
        self.ttl_s = float(ttl_s)
        self.heartbeat = heartbeat
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.held = False
        self._lost: str | None = None
        self._joined = False  # working under another process's hold: never removes the lease
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.store.uri(LEASE_FILE)

    def _record(self) -> bytes:
        now = _now()
        return _json_bytes(
            {"owner": self.owner, "host": self.host, "pid": self.pid, "renewed_at": now, "expires_at": now + self.ttl_s}
        )

    def read(self) -> dict[str, Any] | None:
        """The current lease record, or None when the version is free."""
        try:
            return json.loads(io_retry(lambda: self.store.fs.cat_file(self.store.path(LEASE_FILE)), f"read {self.uri}"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return {"owner": "?", "host": "?", "pid": -1, "expires_at": 0.0}  # torn local write: treat as stale

    def _stale(self, rec: dict[str, Any]) -> bool:
        if float(rec.get("expires_at", 0)) < _now():
            return True
        return rec.get("host") == self.host and rec.get("owner") != self.owner and not _pid_alive(int(rec["pid"]))

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> VersionLease:
        """Take (or join) the lease; wait up to ``wait_s`` for another build to release it."""
        deadline = _now() + wait_s
        while True:
            if _create_exclusive(self.store, self._record(), LEASE_FILE):
                break
            rec = self.read()
            if rec is None:
                continue
            if rec.get("owner") == self.owner:
                io_retry(lambda: self.store.write_bytes(self._record(), LEASE_FILE), f"renew {self.uri}")
                break
            if self._stale(rec):
                log.warning(
                    "taking over stale lease %s of %s (host %s, pid %s)",
                    self.uri,
                    rec.get("owner"),
                    rec.get("host"),
                    rec.get("pid"),
                )
                io_retry(lambda: self.store.remove(LEASE_FILE), f"remove {self.uri}")
                continue
            if _now() >= deadline:
                raise LeaseHeldError(
                    f"dataset version {self.store.uri()} is being written by build {rec.get('owner')!r} "
                    f"(host {rec.get('host')}, pid {rec.get('pid')}, lease valid until "
                    f"{_iso(float(rec.get('expires_at', 0)))}). Wait for that build to finish, or, if it is dead "
                    f"on another host, delete {self.uri} and re-run."
                )
            time.sleep(poll_s)
        # Exclusive create plus a re-read closes most of the race between two builds breaking one stale lease.
        time.sleep(0.05)
        rec = self.read()
        if rec is None or rec.get("owner") != self.owner:
            raise LeaseHeldError(f"lost the race for {self.uri} to build {rec and rec.get('owner')!r}; re-run later")
        self.held, self._lost = True, None
        if self.heartbeat:
            self._stop.clear()
            self._thread = threading.Thread(target=self._renew_loop, name="realfake-lease", daemon=True)
            self._thread.start()
        return self

    def join(self) -> VersionLease:
        """Work under a lease that another process of the same build holds (same ``owner``): a shard-group
        worker or a child flow run. Takes nothing and renews nothing (the holder does); :meth:`check` before each
        commit then stops this worker as soon as the lease passes to another build.

        Raises:
            LeaseLostError: the version has no lease, or another build holds it.
        """
        rec = self.read()
        if rec is None or rec.get("owner") != self.owner:
            holder = f"build {rec.get('owner')!r}" if rec else "nobody"
            raise LeaseLostError(
                f"this worker belongs to build {self.owner!r}, but the lease {self.uri} is held by {holder}: the "
                "build that started it has ended or lost the version; re-run that build"
            )
        self.held, self._lost, self.heartbeat, self._joined = True, None, False, True
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except Exception as e:  # a failed renewal is retried at the next beat; check() reports a loss
                log.warning("lease renewal of %s failed: %s", self.uri, e)

    def renew(self) -> None:
        """Extend the lease; marks it lost if another build took it over."""
        rec = self.read()
        if rec is None or rec.get("owner") != self.owner:
            self._lost = f"lease {self.uri} now held by {rec and rec.get('owner')!r}"
            self._stop.set()
            return
        io_retry(lambda: self.store.write_bytes(self._record(), LEASE_FILE), f"renew {self.uri}")

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this build still holds the lease (called before each commit)."""
        if not self.held:
            raise LeaseLostError(f"lease {self.uri} is not held: acquire it before writing")
        if self._lost:
            raise LeaseLostError(self._lost)
        rec = self.read()
        if rec is None or rec.get("owner") != self.owner:
            self._lost = f"lease {self.uri} now held by {rec and rec.get('owner')!r}"
            raise LeaseLostError(self._lost)

    def release(self) -> None:
        """Give the lease back (only if still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.held and not self._joined:
            rec = self.read()
            if rec is not None and rec.get("owner") == self.owner:
                io_retry(lambda: self.store.remove(LEASE_FILE), f"remove {self.uri}")
        self.held = False

    def __enter__(self) -> VersionLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------
class _IndexColumns:
    """A shard's index rows (:data:`INDEX_SCHEMA`), gathered column by column as plain lists while writing:
    pyarrow converts each list in C once, and the Parquet shard takes its provenance columns from the same lists."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {n: [] for n in INDEX_SCHEMA.names}
        self._sampler: Any = None
        self._sampler_json: str | None = None

    def add(self, rec: SyntheticRecord, shard: str, file: str, fmt: str, image_len: int, meta_json: str) -> None:
        c, m = self.cols, rec.meta
        sampler = m.get("sampler")
        if sampler != self._sampler:  # consecutive records share their sampler settings: encode them once
            self._sampler = copy.deepcopy(sampler)
            self._sampler_json = None if sampler is None else _json_bytes(sampler).decode()
        c["key"].append(rec.key)
        c["shard"].append(shard)
        c["file"].append(file)
        c["label"].append(int(rec.label))
        c["class_name"].append(rec.class_name)
        for name in ("source_sample_id", "prompt", "negative_prompt", "base_model", "base_model_hash",
                     "adapter_hash"):
            c[name].append(_str_or_none(m.get(name)))
        c["replica"].append(_int_or_none(m.get("replica")))
        c["seed"].append(_int_or_none(m.get("seed")))
        c["sampler"].append(self._sampler_json)
        c["image_format"].append(fmt)
        c["image_bytes"].append(image_len)
        c["meta"].append(meta_json)

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.cols, schema=INDEX_SCHEMA)

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
        try:
            raw = io_retry(lambda: self.store.read_bytes(*rel), self.store.uri(*rel))
            return CommitRecord.from_json(json.loads(raw))
        except FileNotFoundError:
            return None

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
        return f"{name}.{_EXT[self.cfg.format]}" if part == 0 else f"{name}-{part}.{_EXT[self.cfg.format]}"

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

        Each file's sha256 and every image's sha256 are computed from the very bytes written, in one pass on a
        helper thread; after the upload the stored size is checked against the bytes written. Only then are the
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
        if not _NAME_OK.match(name):
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
        part_cls = _TarPart if fmt == "webdataset" else _ParquetPart
        files: list[ShardFile] = []
        cols = _IndexColumns()
        seen: set[str] = set()
        labels: Counter[int] = Counter()
        part: _TarPart | _ParquetPart | None = None
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
                if not _KEY_OK.match(rec.key):
                    raise ValueError(
                        f"record key {rec.key!r} in shard {name} must be letters, digits, '_' or '-' "
                        "(no dots: WebDataset splits keys at the first dot); use make_key()"
                    )
                if rec.key in seen:
                    raise ValueError(f"duplicate record key {rec.key!r} in shard {name}")
                seen.add(rec.key)
                image = encode_image(rec.image, ext, self.cfg.jpeg_quality)
                meta_json = _json_bytes(_sample_json(rec))
                cost = part_cls.cost(image, meta_json)
                if part is not None and part.count and part_bytes + cost + trailer > self.cfg.max_bytes:
                    close_part()
                if part is None:
                    part_rel = attempt.rel = self._part_path(name, part_no)
                    dest, tmp = self._open_dest(part_rel)
                    part = _TarPart(dest) if fmt == "webdataset" else \
                        _ParquetPart(dest, self.class_names, cols, len(cols.cols["key"]), ext)
                    part_bytes = 0
                label = int(rec.label)
                cols.add(rec, name, part_rel, ext, len(image), meta_json.decode())
                if isinstance(part, _TarPart):
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
            committed_at=_iso(_now()),
            writer=self.writer_id,
        )
        if self.lease is not None:
            self.lease.check()  # fencing: a build that lost the version must not publish a commit
        payload = json.dumps(commit.to_json(), indent=1, sort_keys=True).encode()
        attempt.rel = posixpath.join(*self._commit_path(name))
        _retry(
            lambda: self.store.write_bytes(payload, *self._commit_path(name), durable=self.durable),
            f"commit {self.store.uri(COMMITS_DIR, name + '.json')}",
            self.retries,
            self.backoff_s,
        )
        return commit


# --------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------
def committed_shards(store: Store, folder: str = "synthetic") -> list[CommitRecord]:
    """Commit records of every committed shard, sorted by name."""
    s = store.child(folder)
    io_retry(lambda: s.fs.invalidate_cache(s.path(COMMITS_DIR)), "invalidate listing cache")  # other workers commit too
    names = [n for n in io_retry(lambda: s.listdir(COMMITS_DIR), f"list {s.uri(COMMITS_DIR)}") if n.endswith(".json")]
    if not names:
        return []
    paths = [s.path(COMMITS_DIR, n) for n in names]
    blobs = _cat(s, paths)
    out = []
    for p in paths:
        try:
            out.append(CommitRecord.from_json(json.loads(blobs[p])))
        except (KeyError, ValueError, TypeError) as e:
            rel = s.uri(COMMITS_DIR, os.path.basename(p))
            raise ShardIntegrityError(f"commit record {rel} is unreadable: {e}") from e
    return sorted(out, key=lambda c: c.name)


def partial_shards(store: Store, folder: str = "synthetic") -> list[str]:
    """Files in the shard folder that belong to no committed shard (crash leftovers, temp files)."""
    s = store.child(folder)
    committed = committed_shards(store, folder)
    owned = {f.path for c in committed for f in c.files} | {INDEX_FILE, WDS_INFO_FILE, RECIPE_FILE}
    parts = {os.path.basename(c.index_part) for c in committed}
    io_retry(lambda: s.fs.invalidate_cache(s.path()), "invalidate listing cache")
    ls = lambda *p: io_retry(lambda: s.listdir(*p), f"list {s.uri(*p)}")  # noqa: E731
    out = [n for n in ls() if n not in owned and n not in (COMMITS_DIR, INDEX_PARTS_DIR)]
    out += [f"{INDEX_PARTS_DIR}/{n}" for n in ls(INDEX_PARTS_DIR) if n not in parts]
    out += [f"{COMMITS_DIR}/{n}" for n in ls(COMMITS_DIR) if not n.endswith(".json")]
    return sorted(out)


def remove_partial_shards(store: Store, folder: str = "synthetic") -> list[str]:
    """Delete crash leftovers (see :func:`partial_shards`); call under the lease, before workers start."""
    s = store.child(folder)
    leftovers = partial_shards(store, folder)
    for rel in leftovers:
        io_retry(lambda rel=rel: s.remove(rel), f"remove {s.uri(rel)}")
    if leftovers:
        log.info("removed %d uncommitted file(s) from %s", len(leftovers), s.uri())
    return leftovers


def _cat(s: Store, paths: list[str]) -> dict[str, bytes]:
    """Small whole objects by path (records, index parts): one batched call, so s3fs fetches them concurrently,
    one GET each."""
    kw = s._whole_get()
    out = s.fs.cat(paths, on_error="return", **kw) if len(paths) > 1 else {}
    for p in paths:
        # Objects that failed in the batch are fetched again one by one, each with its own retries.
        if not isinstance(out.get(p), bytes):
            if isinstance(out.get(p), FileNotFoundError):
                raise out[p]
            out[p] = io_retry(lambda p=p: s.fs.cat_file(p, **kw), f"read {p}")
    return out


class _HashingReader(io.RawIOBase):
    """A read-only wrapper that hands everything read through it to a hash-only :class:`_Checksummer`."""

    def __init__(self, raw: IO[bytes], sums: _Checksummer) -> None:
        self.raw = raw
        self.sums = sums

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        if n:
            self.sums.write(data)
        return n

    def drain(self) -> None:
        while self.readinto(bytearray(_CHUNK)):
            pass


def _opened_size(store: Store, raw: IO[bytes], rel: str) -> int:
    """Size of an object just opened for reading, without another round trip where the handle knows it
    (fsspec's buffered remote files learn it when opening; local files from fstat; a memory map knows it)."""
    if isinstance(raw, pa.NativeFile):
        return raw.size()
    size = getattr(raw, "size", None)
    if isinstance(size, int):
        return size
    if store.local:
        try:
            return os.fstat(raw.fileno()).st_size
        except (AttributeError, OSError, io.UnsupportedOperation):
            pass
    return int(io_retry(lambda: store.size(rel), f"stat {store.uri(rel)}"))


def _iter_tar(f: IO[bytes], path: str, image_format: str) -> Iterator[ShardSample]:
    current: dict[str, bytes] = {}
    key = None

    def emit() -> ShardSample:
        missing = [e for e in (image_format, "cls", "json") if e not in current]
        if missing:
            raise ShardIntegrityError(f"{path}: sample {key!r} lacks member(s) {missing}")
        return ShardSample(
            key=key,
            label=int(current["cls"]),
            image=current[image_format],
            image_format=image_format,
            meta=json.loads(current["json"]),
        )

    with tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, _, ext = m.name.partition(".")
            if k != key and key is not None:
                yield emit()
                current = {}
            key = k
            data = tar.extractfile(m)
            current[ext] = data.read() if data else b""
    if key is not None:
        yield emit()


def _iter_parquet(f: IO[bytes], path: str, image_format: str) -> Iterator[ShardSample]:
    pf = pq.ParquetFile(f)
    for i in range(pf.num_row_groups):
        # only what a sample carries: the typed provenance columns duplicate ``meta`` (for SQL-style readers)
        for row in pf.read_row_group(i, columns=["key", "label", "image", "meta"]).to_pylist():
            yield ShardSample(
                key=row["key"],
                label=int(row["label"]),
                image=row["image"]["bytes"],
                image_format=image_format,
                meta=json.loads(row["meta"]),
            )


def check_file_size(store: Store, raw: IO[bytes], sf: ShardFile) -> None:
    """Raise :class:`ShardIntegrityError` unless the opened shard file has the size its commit record gives
    (a truncated or overwritten file is never read as data)."""
    size = _opened_size(store, raw, sf.path)
    if size != sf.bytes:
        raise ShardIntegrityError(f"{store.uri(sf.path)} has {size} bytes, its commit record says {sf.bytes}")


def iter_shard(store: Store, commit: CommitRecord, check: bool = True, checksum: bool = False
               ) -> Iterator[ShardSample]:
    """Samples of one committed shard (store rooted at the shard folder), images still encoded.

    With ``check``, each file's size is compared with its commit record before reading (a truncated shard
    yields nothing) and its sample count after. With ``checksum`` as well, its sha256 is compared after reading
    (computed on a helper thread from the bytes as they are read, no second pass): what ``realfake verify`` and
    a resumed build do. Training readers skip it: a commit record is written only after the file's size was
    confirmed in storage, and the sha256 pass would cost more than parsing a Parquet shard. A mismatch raises
    :class:`ShardIntegrityError`.
    """
    for sf in commit.files:
        uri = store.uri(sf.path)
        if not store.local:  # another worker may have written it after this client cached the folder's listing
            store.fs.invalidate_cache(store.path(sf.path))
        # A local Parquet shard is memory-mapped (random access, parsed and hashed in place with no copy into a
        # fresh buffer, which costs about as much as the hash); every other file is opened as a stream.
        mapped = commit.format == "parquet" and store.local
        with contextlib.closing(pa.memory_map(store.path(sf.path))) if mapped else store.open(sf.path) as raw:
            if check:
                check_file_size(store, raw, sf)
            sums = _Checksummer(None) if check and checksum else None  # hashes on its helper thread
            try:
                n = 0
                if commit.format == "webdataset" and sums is not None and not store.local:
                    # a remote tar being verified: one GET of the whole object, hashed on the helper thread while
                    # it is parsed from memory (s3fs holds a block that size anyway)
                    data = raw.read()
                    sums.write(data)
                    for n, sample in enumerate(_iter_tar(io.BytesIO(data), uri, commit.image_format), 1):  # noqa: B007
                        yield sample
                elif commit.format == "webdataset":
                    hashing = _HashingReader(raw, sums) if sums is not None else None
                    src = io.BufferedReader(hashing, _CHUNK) if hashing is not None else raw
                    for n, sample in enumerate(_iter_tar(src, uri, commit.image_format), 1):  # noqa: B007
                        yield sample
                    if hashing is not None:
                        hashing.drain()  # the tar end-of-archive blocks count towards the checksum
                else:
                    # Parquet needs random access: the mapped file, or a remote object read whole in one request;
                    # hashed on the helper thread meanwhile.
                    data = raw.read_buffer() if mapped else raw.read()
                    if sums is not None:
                        sums.write(data)
                    for n, sample in enumerate(  # noqa: B007
                            _iter_parquet(pa.BufferReader(data), uri, commit.image_format), 1):
                        yield sample
                if sums is not None:
                    _, digest = sums.close()
                    if digest != sf.sha256:
                        raise ShardIntegrityError(f"{uri}: sha256 {digest} does not match its commit record")
                if check and n != sf.count:
                    raise ShardIntegrityError(f"{uri}: {n} samples, its commit record says {sf.count}")
            finally:
                if sums is not None:
                    sums.abandon()  # joins the helper thread before the map closes: it may be hashing the map


def verify_shard(store: Store, commit: CommitRecord) -> list[str]:
    """Problems with one committed shard (store rooted at the shard folder); empty when it is intact."""
    problems: list[str] = []
    try:
        keys = [s.key for s in iter_shard(store, commit, check=True, checksum=True)]
    except FileNotFoundError as e:
        return [f"shard {commit.name}: file missing ({e})"]
    except (ShardIntegrityError, tarfile.TarError, OSError, ValueError, KeyError) as e:
        return [f"shard {commit.name}: {e}"]
    if len(set(keys)) != len(keys):
        problems.append(f"shard {commit.name}: duplicate keys inside the shard")
    try:
        part = store.read_bytes(commit.index_part)
    except FileNotFoundError:
        return [*problems, f"shard {commit.name}: index part {store.uri(commit.index_part)} missing"]
    if hashlib.sha256(part).hexdigest() != commit.index_sha256:
        problems.append(f"shard {commit.name}: index part {store.uri(commit.index_part)} checksum mismatch")
    else:
        idx_keys = pq.read_table(io.BytesIO(part), columns=["key"]).column("key").to_pylist()
        if idx_keys != keys:
            problems.append(f"shard {commit.name}: keys in the shard differ from its index part")
    return problems


def iter_synthetic(
    store: Store, folder: str = "synthetic", check: bool = True, checksum: bool = False
) -> Iterator[tuple[Image.Image, int, dict[str, Any]]]:
    """Decoded ``(image, label, meta)`` of every committed shard, in shard-name order; uncommitted files are ignored.

    ``check`` / ``checksum`` as in :func:`iter_shard`.
    """
    s = store.child(folder)
    for commit in committed_shards(store, folder):
        for sample in iter_shard(s, commit, check=check, checksum=checksum):
            img = Image.open(io.BytesIO(sample.image))
            img.load()
            yield img, sample.label, sample.meta


def committed_keys(store: Store, folder: str = "synthetic") -> dict[str, list[str]]:
    """Shard name -> keys (in shard order) of every committed shard, read from the index parts."""
    s = store.child(folder)
    commits = committed_shards(store, folder)
    if not commits:
        return {}
    paths = [s.path(c.index_part) for c in commits]
    blobs = _index_parts(s, commits, paths)
    return {
        c.name: pq.read_table(io.BytesIO(blobs[p]), columns=["key"]).column("key").to_pylist()
        for c, p in zip(commits, paths, strict=True)
    }


def _index_parts(s: Store, commits: list[CommitRecord], paths: list[str]) -> dict[str, bytes]:
    """The index parts of ``commits`` by path; a missing one is a damaged version, reported as such with the fix."""
    try:
        return _cat(s, paths)
    except FileNotFoundError as e:
        missing = next((c for c, p in zip(commits, paths, strict=True) if not s.fs.exists(p)), None)
        if missing is None:
            raise
        commit_uri = s.uri(*(COMMITS_DIR, f"{missing.name}.json"))
        raise ShardIntegrityError(
            f"the index part {s.uri(missing.index_part)} of committed shard {missing.name} is missing (its commit "
            f"record {commit_uri} names it): the version is damaged. Run `realfake verify` on the version to list "
            f"every problem; to rebuild the shard, delete {commit_uri} and re-run the build (it rewrites shards "
            "without a commit record and keeps the others)."
        ) from e


def read_index(store: Store, folder: str = "synthetic") -> pa.Table:
    """``{folder}/index.parquet``."""
    return io_retry(lambda: store.read_table(folder, INDEX_FILE), store.uri(folder, INDEX_FILE))


def write_index(store: Store, folder: str = "synthetic") -> pa.Table:
    """Write ``{folder}/index.parquet`` (one row per image of every committed shard) and, for WebDataset
    shards, the ``_info.json`` split description; returns the index table."""
    s = store.child(folder)
    commits = committed_shards(store, folder)
    if commits:
        paths = [s.path(c.index_part) for c in commits]
        blobs = _index_parts(s, commits, paths)
        tables = []
        for c, p in zip(commits, paths, strict=True):
            if hashlib.sha256(blobs[p]).hexdigest() != c.index_sha256:
                raise ShardIntegrityError(f"index part {s.uri(c.index_part)} does not match its commit record")
            tables.append(pq.read_table(io.BytesIO(blobs[p])).cast(INDEX_SCHEMA))
        table = pa.concat_tables(tables)
    else:
        table = INDEX_SCHEMA.empty_table()
    io_retry(lambda: s.write_table(table, INDEX_FILE), f"write {s.uri(INDEX_FILE)}")
    if any(c.format == "webdataset" for c in commits):
        write_wds_info(store, folder, commits)
    return table


def write_wds_info(store: Store, folder: str = "synthetic", commits: list[CommitRecord] | None = None) -> dict:
    """Write the ``_info.json`` that timm's ``wds/`` reader loads: one ``train`` split listing the committed tars
    (paths relative to the folder) with their sample counts."""
    commits = committed_shards(store, folder) if commits is None else commits
    files = [f for c in commits if c.format == "webdataset" for f in c.files]
    class_counts: Counter[int] = Counter()
    for c in commits:
        class_counts.update(c.class_counts)
    info = {
        "name": f"{store.root.rstrip('/').split('/')[-2] if '/' in store.root else store.root}-synthetic",
        "num_classes": len(class_counts),
        "splits": {
            WDS_SPLIT: {
                "name": WDS_SPLIT,
                "num_samples": sum(f.count for f in files),
                "filenames": [f.path for f in files],
                "shard_lengths": [f.count for f in files],
            }
        },
    }
    s = store.child(folder)
    io_retry(lambda: s.write_json(info, WDS_INFO_FILE), f"write {s.uri(WDS_INFO_FILE)}")
    return info


# --------------------------------------------------------------------------------------------------------
# Planning across runs: resume, extend, overwrite
# --------------------------------------------------------------------------------------------------------
def plan_pending(
    store: Store,
    items: Sequence,
    key: Callable[[Any], str],
    max_count: int,
    mode: Literal["resume", "extend", "overwrite"] = "resume",
    prefix: str = "shard",
    folder: str = "synthetic",
    lease: VersionLease | None = None,
    recipe: dict[str, Any] | None = None,
    may_grow: Collection[str] = (),
) -> list[ShardPlan]:
    """The shards still to write for ``items``, given what the version already holds.

    Call once per run, under the lease, before the workers start; it also removes crash leftovers.

    - ``resume``: the committed shards must be exactly shards of ``plan_shards(items)``; returns the others,
      with the same names, so a resumed build ends byte-identical to an uninterrupted one.
    - ``extend``: as resume when nothing changed; when items were added (more images per class, new classes),
      returns new shards numbered after the last one holding only the items not yet committed. Committed
      shards are never touched.
    - ``overwrite``: deletes every shard, the index and the card, then plans everything; with a ``recipe``, only
      when the committed shards were made under another recipe or plan (a re-run of an interrupted overwrite
      resumes it).

    ``recipe`` (see :mod:`realfake.recipe`) is what the shards' content depends on. It is recorded in
    ``{folder}/_recipe.json`` before any shard of it is written (the same bytes from every worker of a build), and
    committed shards recorded under another recipe, or under none, are refused in ``resume`` and ``extend``.
    ``may_grow`` names the recipe fields only ``extend`` may change (:func:`~realfake.recipe.recipe_diff`), and
    then the items must hold the committed ones, as without a recipe.

    Raises:
        RecipeMismatchError: The committed shards were made under another recipe; the message names the fields
            that differ and how to overwrite them or write a new version.
        ValueError: With the fix in the message, when committed items are missing from ``items`` or (resume)
            when ``items`` changed since the version was written.
    """
    if lease is not None:
        lease.check()
    if mode not in ("resume", "extend", "overwrite"):
        raise ValueError(f"mode must be resume, extend or overwrite, got {mode!r}")
    full = plan_shards(items, max_count, prefix)
    if mode == "overwrite" and recipe is None:
        _remove_shards_and_card(store, folder)
        return full
    remove_partial_shards(store, folder)
    done = committed_keys(store, folder)
    by_name = {p.name: p for p in full}
    consistent = all(n in by_name and [key(i) for i in by_name[n].items] == ks for n, ks in done.items())
    recorded = read_recipe(store, folder) if recipe is not None else None
    if recipe is not None and done:
        if recorded is None:
            differ = ["no recipe recorded with them (written by an earlier realfake)"]
        else:  # only an extension may change the may_grow fields
            differ = recipe_diff(recorded, recipe, may_grow if mode == "extend" else ())
        if differ and mode != "overwrite":
            grows = recorded is not None and not recipe_diff(recorded, recipe, may_grow)
            raise RecipeMismatchError(mismatch_message(f"the {len(done)} committed shard(s) in {store.uri(folder)}",
                                                       differ, grows, posixpath.basename(store.root)))
        if differ or (mode == "overwrite" and not consistent):
            log.info("overwrite: deleting the %d committed shard(s) of %s (%s)", len(done), store.uri(folder),
                     "; ".join(differ) or "another plan")
            _remove_shards_and_card(store, folder)
            done, consistent, recorded = {}, True, None
    pending = _pending(store, items, key, max_count, mode, prefix, folder, full, done, consistent)
    if recipe is not None and (recorded is None or canonical(recorded) != canonical(recipe)):
        # before the first shard of this recipe commits; every worker of a build writes these same bytes
        target = store.child(folder)
        io_retry(lambda: target.write_bytes(recipe_bytes(recipe), RECIPE_FILE), f"write {target.uri(RECIPE_FILE)}")
    return pending


def _pending(store: Store, items: Sequence, key: Callable[[Any], str], max_count: int, mode: str, prefix: str,
             folder: str, full: list[ShardPlan], done: dict[str, list[str]], consistent: bool) -> list[ShardPlan]:
    """The body of :func:`plan_pending` once the committed shards are known (and the recipe accepted)."""
    if not done:
        return full
    if consistent:
        return [p for p in full if p.name not in done]
    done_keys = {k for ks in done.values() for k in ks}
    item_keys = {key(i) for i in items}
    missing = done_keys - item_keys
    if missing:
        raise ValueError(
            f"{len(missing)} committed image(s) of {store.uri(folder)} are not among the planned items "
            f"(e.g. {sorted(missing)[:3]}): the configuration changed; use mode='overwrite' (--set mode=overwrite) "
            "or a new version"
        )
    if mode == "resume":
        raise ValueError(
            f"the planned items of {store.uri(folder)} differ from its committed shards (images were added or "
            "max_count changed): use mode='extend' (--set mode=extend) to add the new images, or mode='overwrite' "
            "to rebuild"
        )
    pending = [i for i in items if key(i) not in done_keys]
    start = max(int(n.rsplit("-", 1)[1]) for n in done if n.rsplit("-", 1)[-1].isdigit()) + 1
    return plan_shards(pending, max_count, prefix, start=start)


def _remove_shards_and_card(store: Store, folder: str) -> None:
    io_retry(lambda: store.remove(folder, recursive=True), f"remove {store.uri(folder)}")
    io_retry(lambda: store.remove("dataset.json"), f"remove {store.uri('dataset.json')}")


def read_recipe(store: Store, folder: str = "synthetic") -> dict[str, Any] | None:
    """The recipe recorded with a version's shards (``{folder}/_recipe.json``, see :func:`plan_pending`), or None."""
    s = store.child(folder)
    try:
        raw = io_retry(lambda: s.read_bytes(RECIPE_FILE), f"read {s.uri(RECIPE_FILE)}")
    except FileNotFoundError:
        return None
    try:
        recipe = json.loads(raw)
    except ValueError as e:
        raise ShardIntegrityError(f"{s.uri(RECIPE_FILE)} is not valid JSON ({e})") from e
    if not isinstance(recipe, dict):
        raise ShardIntegrityError(f"{s.uri(RECIPE_FILE)} holds {type(recipe).__name__}, not a recipe (a mapping)")
    return recipe
