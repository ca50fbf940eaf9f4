"""What a shard is: its records, plan, commit record, errors, the index schema, keys and image encoding."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
from PIL import Image

from realfake.data.storage import StorageError

COMMITS_DIR = "_commits"
INDEX_PARTS_DIR = "_index"
INDEX_FILE = "index.parquet"
WDS_INFO_FILE = "_info.json"
RECIPE_FILE = "_recipe.json"  # in the shard folder: the recipe every committed shard of the version was made under
PLAN_FILE = "_plan.parquet"  # in the shard folder: the build's plan of the shards still to write, for its shard groups
WDS_SPLIT = "train"  # synthetic data is training data; timm's `wds/` reader defaults to split "train"
EXT = {"webdataset": "tar", "parquet": "parquet"}
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
KEY_OK = re.compile(r"^[A-Za-z0-9_-]+$")
NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")

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
    if not NAME_OK.match(prefix):
        raise ValueError(f"shard prefix {prefix!r} must be letters, digits, '_' or '-' (no dots)")
    items = tuple(items)
    return [
        ShardPlan(name=f"{prefix}-{start + i:06d}", index=start + i, items=items[j : j + max_count])
        for i, j in enumerate(range(0, len(items), max_count))
    ]


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


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sample_json(rec: SyntheticRecord) -> dict[str, Any]:
    return {**rec.meta, "key": rec.key, "label": int(rec.label), "class_name": rec.class_name}


def int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)


class IndexColumns:
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
            self._sampler_json = None if sampler is None else json_bytes(sampler).decode()
        c["key"].append(rec.key)
        c["shard"].append(shard)
        c["file"].append(file)
        c["label"].append(int(rec.label))
        c["class_name"].append(rec.class_name)
        for name in ("source_sample_id", "prompt", "negative_prompt", "base_model", "base_model_hash",
                     "adapter_hash"):
            c[name].append(str_or_none(m.get(name)))
        c["replica"].append(int_or_none(m.get("replica")))
        c["seed"].append(int_or_none(m.get("seed")))
        c["sampler"].append(self._sampler_json)
        c["image_format"].append(fmt)
        c["image_bytes"].append(image_len)
        c["meta"].append(meta_json)

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.cols, schema=INDEX_SCHEMA)
