"""The version's index: per-shard index parts, ``index.parquet`` (one row per image of every committed shard)
and the ``_info.json`` split description timm's ``wds/`` reader loads."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from realfake.data.shards.reader import cat_whole, committed_shards
from realfake.data.shards.records import (
    COMMITS_DIR,
    INDEX_FILE,
    INDEX_SCHEMA,
    WDS_INFO_FILE,
    WDS_SPLIT,
    CommitRecord,
    ShardIntegrityError,
)
from realfake.data.storage import Store, io_retry, read_parquet

__all__ = ["IndexSummary", "committed_keys", "index_parts", "read_index", "write_index", "write_wds_info"]


def committed_keys(store: Store, folder: str = "synthetic") -> dict[str, list[str]]:
    """Shard name -> keys (in shard order) of every committed shard, read from the index parts."""
    s = store.child(folder)
    commits = committed_shards(store, folder)
    if not commits:
        return {}
    paths = [s.path(c.index_part) for c in commits]
    blobs = index_parts(s, commits, paths)
    return {
        c.name: read_parquet(blobs[p], columns=["key"]).column("key").to_pylist()
        for c, p in zip(commits, paths, strict=True)
    }


def index_parts(s: Store, commits: list[CommitRecord], paths: list[str]) -> dict[str, bytes]:
    """The index parts of ``commits`` by path; a missing one is a damaged version, reported as such with the fix."""
    try:
        return cat_whole(s, paths)
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


@dataclass(frozen=True)
class IndexSummary:
    """What :func:`write_index` wrote: its rows, images and class name per label, and the file's sha256."""

    rows: int
    class_counts: dict[int, int]
    class_names: dict[int, str]  # per label, the class name of its last row (as the index reads back)
    sha256: str


# Index parts fetched per batched read while the index is written: memory is bounded by this many parts (a part
# is ~1 KB a row compressed; 32 parts of 1,000 rows ~ 30 MB), not by the version (benchmarks/results/scale.md).
PARTS_PER_READ = 32


def write_index(store: Store, folder: str = "synthetic", commits: list[CommitRecord] | None = None) -> IndexSummary:
    """Write ``{folder}/index.parquet`` (one row per image of every committed shard, in shard order) and, for
    WebDataset shards, the ``_info.json`` split description; returns what was written (:class:`IndexSummary`).

    Streamed: each index part is checked against its commit record and appended to the file as its own row group,
    so memory holds a few parts, never the whole index. ``commits``: the version's commit records where the caller
    already read them (read here otherwise)."""
    s = store.child(folder)
    commits = committed_shards(store, folder) if commits is None else commits
    counts: Counter[int] = Counter()
    names: dict[int, str] = {}
    if not commits:
        data = _table_bytes(INDEX_SCHEMA.empty_table())
        io_retry(lambda: s.write_bytes(data, INDEX_FILE), f"write {s.uri(INDEX_FILE)}")
        return IndexSummary(0, {}, {}, hashlib.sha256(data).hexdigest())
    rows = 0
    with s.staged(INDEX_FILE) as tmp:
        with pq.ParquetWriter(tmp, INDEX_SCHEMA, compression="zstd") as writer:
            for i in range(0, len(commits), PARTS_PER_READ):
                batch = commits[i : i + PARTS_PER_READ]
                paths = [s.path(c.index_part) for c in batch]
                blobs = index_parts(s, batch, paths)
                for c, p in zip(batch, paths, strict=True):
                    if hashlib.sha256(blobs[p]).hexdigest() != c.index_sha256:
                        raise ShardIntegrityError(f"index part {s.uri(c.index_part)} does not match its commit "
                                                  "record")
                    table = read_parquet(blobs.pop(p)).cast(INDEX_SCHEMA)
                    writer.write_table(table)
                    rows += table.num_rows
                    labels = table.column("label").to_pylist()
                    counts.update(labels)
                    names.update(zip(labels, table.column("class_name").to_pylist(), strict=True))
        digest = _file_sha256(tmp)
    if any(c.format == "webdataset" for c in commits):
        write_wds_info(store, folder, commits)
    return IndexSummary(rows, dict(counts), names, digest)


def _table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")  # as Store.write_table
    return buf.getvalue()


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
