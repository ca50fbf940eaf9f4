"""Reading committed shards: which shards are committed, their samples (the one reader of verify, resume and
training), their verification, and the sweep of files no commit record names."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from collections.abc import Collection, Iterator
from typing import IO, Any

import pyarrow as pa
from PIL import Image

from realfake.data.commit import sweep
from realfake.data.shards.parquet import iter_parquet
from realfake.data.shards.records import (
    COMMITS_DIR,
    INDEX_FILE,
    INDEX_PARTS_DIR,
    PLAN_FILE,
    RECIPE_FILE,
    WDS_INFO_FILE,
    CommitRecord,
    ShardFile,
    ShardIntegrityError,
    ShardSample,
)
from realfake.data.shards.tar import iter_tar
from realfake.data.storage import Store, io_retry, read_parquet

__all__ = [
    "cat_whole",
    "check_file_size",
    "commit_records",
    "committed_names",
    "committed_shards",
    "iter_shard",
    "iter_synthetic",
    "partial_shards",
    "remove_partial_shards",
    "verify_shard",
]

log = logging.getLogger(__name__)


def cat_whole(s: Store, paths: list[str]) -> dict[str, bytes]:
    """Small whole objects by path (records, index parts): one batched call, so s3fs fetches them concurrently,
    one GET each (:meth:`Store._whole_get`)."""
    kw = s._whole_get()
    out = s.fs.cat(paths, on_error="return", **kw) if len(paths) > 1 else {}
    for p in paths:
        # Objects that failed in the batch are fetched again one by one, each with its own retries.
        if not isinstance(out.get(p), bytes):
            if isinstance(out.get(p), FileNotFoundError):
                raise out[p]
            out[p] = io_retry(lambda p=p: s.fs.cat_file(p, **kw), f"read {p}")
    return out


def committed_names(store: Store, folder: str = "synthetic") -> list[str]:
    """Names of the committed shards, sorted: one listing of their commit records (none of them is read)."""
    s = store.child(folder)
    io_retry(lambda: s.fs.invalidate_cache(s.path(COMMITS_DIR)), "invalidate listing cache")  # other workers commit too
    listed = io_retry(lambda: s.listdir(COMMITS_DIR), f"list {s.uri(COMMITS_DIR)}")
    return sorted(n[: -len(".json")] for n in listed if n.endswith(".json"))


def committed_shards(store: Store, folder: str = "synthetic") -> list[CommitRecord]:
    """Commit records of every committed shard, sorted by name."""
    return _read_records(store.child(folder), committed_names(store, folder))


def commit_records(store: Store, names: Collection[str], folder: str = "synthetic") -> list[CommitRecord]:
    """Commit records of those of ``names`` that are committed, sorted by name: one listing, then only their
    records are read (a shard group's own shards; :func:`committed_shards` reads every record of the version)."""
    wanted = set(names)
    return _read_records(store.child(folder), [n for n in committed_names(store, folder) if n in wanted])


def _read_records(s: Store, names: list[str]) -> list[CommitRecord]:
    """The commit records of the shards ``names`` of the shard folder ``s``, in one batched read, sorted by name."""
    if not names:
        return []
    paths = [s.path(COMMITS_DIR, f"{n}.json") for n in names]
    blobs = cat_whole(s, paths)
    out = []
    for p in paths:
        try:
            out.append(CommitRecord.from_json(json.loads(blobs[p])))
        except (KeyError, ValueError, TypeError) as e:
            rel = s.uri(COMMITS_DIR, os.path.basename(p))
            raise ShardIntegrityError(f"commit record {rel} is unreadable: {e}") from e
    return sorted(out, key=lambda c: c.name)


def _named(store: Store, folder: str, shards: Collection[str] | None = None) -> dict[tuple[str, ...], set[str]]:
    """Per sub-folder of the shard folder, the entries that committed shards (or the version's own files) name;
    with ``shards``, only the commit records of those shards are read (their leftovers are the only ones asked)."""
    committed = committed_shards(store, folder) if shards is None else commit_records(store, shards, folder)
    owned = {f.path for c in committed for f in c.files} | {INDEX_FILE, WDS_INFO_FILE, RECIPE_FILE, PLAN_FILE}
    return {
        (): owned | {COMMITS_DIR, INDEX_PARTS_DIR},
        (INDEX_PARTS_DIR,): {os.path.basename(c.index_part) for c in committed},
        (COMMITS_DIR,): {f"{c.name}.json" for c in committed},
    }


def partial_shards(store: Store, folder: str = "synthetic") -> list[str]:
    """Files in the shard folder that belong to no committed shard (crash leftovers, temp files)."""
    s = store.child(folder)
    io_retry(lambda: s.fs.invalidate_cache(s.path()), "invalidate listing cache")
    out = []
    for sub, keep in _named(store, folder).items():
        out += ["/".join((*sub, n)) for n in io_retry(lambda sub=sub: s.listdir(*sub), f"list {s.uri(*sub)}")
                if n not in keep]
    return sorted(out)


def _of_shards(name: str, shards: Collection[str]) -> bool:
    """Whether a file of the shard folder, ``_index/`` or ``_commits/`` belongs to one of ``shards``: its name up
    to the first dot is the shard's name, or the name of one of the shard's later files (``{name}-{part}``)."""
    stem = name.split(".", 1)[0]
    base, _, part = stem.rpartition("-")
    return stem in shards or (part.isdigit() and base in shards)


def remove_partial_shards(store: Store, folder: str = "synthetic", shards: Collection[str] | None = None
                          ) -> list[str]:
    """Delete crash leftovers (see :func:`partial_shards`) with :func:`realfake.data.commit.sweep`; call under
    the lease, before workers start.

    With ``shards``, only the leftovers of those shards are removed: what one shard group of a running build may
    remove, since the other groups write their shards (temp files, parts and index parts not yet committed)
    meanwhile (benchmarks/results/scale.md: 8 of 10 concurrent groups failed when each removed every leftover)."""
    s = store.child(folder)
    io_retry(lambda: s.fs.invalidate_cache(s.path()), "invalidate listing cache")
    leftovers = []
    for sub, keep in _named(store, folder, shards).items():
        if shards is None:
            leftovers += ["/".join((*sub, n)) for n in sweep(s, keep, *sub)]
            continue
        for n in io_retry(lambda sub=sub: s.listdir(*sub), f"list {s.uri(*sub)}"):
            if n not in keep and _of_shards(n, shards):
                io_retry(lambda n=n, sub=sub: s.remove(*sub, n, recursive=True), f"remove {s.uri(*sub, n)}")
                leftovers.append("/".join((*sub, n)))
    if leftovers:
        log.info("removed %d uncommitted file(s) from %s", len(leftovers), s.uri())
    return sorted(leftovers)


def _opened_size(store: Store, raw: IO[bytes], rel: str) -> int:
    """Size of a file just opened for reading, without another round trip where the handle knows it."""
    size = getattr(raw, "size", None)
    if isinstance(size, int):
        return size
    if store.local:
        try:
            return os.fstat(raw.fileno()).st_size
        except (AttributeError, OSError, io.UnsupportedOperation):
            pass
    return int(io_retry(lambda: store.size(rel), f"stat {store.uri(rel)}"))


def check_file_size(store: Store, raw: IO[bytes], sf: ShardFile) -> None:
    """Raise :class:`ShardIntegrityError` unless the opened shard file has the size its commit record gives
    (a truncated or overwritten file is never read as data)."""
    _check_size(store, _opened_size(store, raw, sf.path), sf)


def _check_size(store: Store, size: int, sf: ShardFile) -> None:
    if size != sf.bytes:
        raise ShardIntegrityError(f"{store.uri(sf.path)} has {size} bytes, its commit record says {sf.bytes}")


@contextlib.contextmanager
def _shard_source(store: Store, sf: ShardFile, fmt: str) -> Iterator[Any]:
    """One shard file to read: a local tar as an open file (streamed), a local Parquet file as its memory map's
    buffer, and anything remote as the bytes of one whole-object GET (:meth:`Store.read_bytes`: no HEAD, no
    listing cache that predates another worker's object)."""
    if not store.local:
        yield io_retry(lambda: store.read_bytes(sf.path), f"read {store.uri(sf.path)}")
    elif fmt == "parquet":
        with contextlib.closing(pa.memory_map(store.path(sf.path))) as mapped:
            yield mapped.read_buffer()
    else:
        with store.open(sf.path) as raw:
            yield raw


def iter_shard(store: Store, commit: CommitRecord, check: bool = True, checksum: bool = False, meta: bool = True
               ) -> Iterator[ShardSample]:
    """Samples of one committed shard (store rooted at the shard folder), images still encoded.

    With ``check``, each file's size is compared with its commit record before reading (a truncated shard yields
    nothing) and its sample count after. With ``checksum`` as well, its sha256 is compared after reading
    (computed from the bytes as they are read, no second pass): what ``realfake verify``, a resumed build and a
    checked training stream do. A mismatch raises :class:`ShardIntegrityError`. ``meta=False`` leaves each
    sample's ``meta`` empty (training needs only the image and label).
    """
    for sf in commit.files:
        uri = store.uri(sf.path)
        with _shard_source(store, sf, commit.format) as src:
            in_hand = not hasattr(src, "read")  # bytes or a buffer, not a stream
            if check:
                _check_size(store, len(src) if in_hand else _opened_size(store, src, sf.path), sf)
            sha = hashlib.sha256() if check and checksum else None
            if commit.format == "parquet":
                if sha is not None:
                    sha.update(src)
                samples = iter_parquet(src, commit.image_format, meta)
            else:
                samples = iter_tar(io.BytesIO(src) if in_hand else src, uri, commit.image_format, sha, meta)
            n = 0
            for n, sample in enumerate(samples, 1):  # noqa: B007
                yield sample
            if sha is not None and (digest := sha.hexdigest()) != sf.sha256:
                raise ShardIntegrityError(f"{uri}: sha256 {digest} does not match its commit record")
            if check and n != sf.count:
                raise ShardIntegrityError(f"{uri}: {n} samples, its commit record says {sf.count}")


def verify_shard(store: Store, commit: CommitRecord) -> list[str]:
    """Problems with one committed shard (store rooted at the shard folder); empty when it is intact."""
    problems: list[str] = []
    try:
        keys = [s.key for s in iter_shard(store, commit, check=True, checksum=True)]
    except FileNotFoundError as e:
        return [f"shard {commit.name}: file missing ({e})"]
    except (ShardIntegrityError, OSError, ValueError, KeyError) as e:
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
        idx_keys = read_parquet(part, columns=["key"]).column("key").to_pylist()
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
