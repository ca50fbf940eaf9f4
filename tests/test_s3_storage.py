"""The storage layer against a real S3 API (moto's server on loopback, reached through s3fs/botocore).

Write, commit, resume and verify a miniature build on S3; exclusive leases through conditional puts; a proxy
that fails a share of requests (before or after the server acts) so the build completes through retries;
SIGKILL of the writing process at chosen requests (the invariants checked after each kill), then resume.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import uuid
from urllib.parse import unquote

import pytest
from support.s3 import BUCKET, S3Env, S3Interceptor, faulty_s3, moto, s3, s3_options  # noqa: F401 - pytest fixtures
from test_shards import (
    S3_KILLS,
    KillPoint,
    assert_same_as_uninterrupted,
    item_key,
    items_for,
    kill_chain,
    mini_build,
    plan_shards,
    record_for,
)

from realfake.config import ShardConfig
from realfake.data.card import inspect_version, verify_version
from realfake.data.shards import (
    COMMITS_DIR,
    LeaseHeldError,
    ShardWriter,
    VersionLease,
    committed_shards,
    iter_shard,
    iter_synthetic,
    partial_shards,
    read_index,
    verify_shard,
)
from realfake.data.storage import version_store

pytestmark = pytest.mark.s3


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_write_commit_resume_verify_on_s3(s3: S3Env, fmt: str) -> None:  # noqa: F811
    store = version_store(s3.root, "toy", "v1", s3.storage_options)
    cfg = ShardConfig(format=fmt, max_count=4)
    items = items_for(4)
    mini_build(store, items, cfg, workers=2)
    uri = store.uri()
    assert uri.startswith("s3://")
    assert verify_version(uri, s3.storage_options) == []
    assert "12 images in 3" in inspect_version(uri, s3.storage_options)

    # A crash between data and commit: the commit record is gone and the object is truncated.
    victim = plan_shards(items, 4)[1].name
    ext = "tar" if fmt == "webdataset" else "parquet"
    data = store.read_bytes("synthetic", f"{victim}.{ext}")
    store.remove("synthetic", COMMITS_DIR, f"{victim}.json")
    store.write_bytes(data[:100], "synthetic", f"{victim}.{ext}")
    store.fs.invalidate_cache()
    assert victim not in {c.name for c in committed_shards(store)}
    assert f"{victim}.{ext}" in partial_shards(store)
    assert len(list(iter_synthetic(store))) == 8  # the truncated shard is never read
    assert verify_version(uri, s3.storage_options) != []

    redone = mini_build(store, items, cfg)
    assert [c.name for c in redone] == [victim]
    assert store.read_bytes("synthetic", f"{victim}.{ext}") == data
    assert verify_version(uri, s3.storage_options) == []


@pytest.mark.parametrize("memory_spool_bytes", [1 << 30, 4096], ids=["in-memory", "spilled-to-disk"])
def test_remote_shards_upload_from_memory_or_from_a_spill_file(
    s3: S3Env,  # noqa: F811
    tmp_path,
    monkeypatch,
    memory_spool_bytes: int,
) -> None:
    import realfake.data.shards.writer as shards_mod

    spills: list[str] = []
    real_mkstemp = shards_mod.tempfile.mkstemp
    monkeypatch.setattr(shards_mod.tempfile, "mkstemp", lambda **kw: (r := real_mkstemp(**kw), spills.append(r[1]))[0])
    store = version_store(s3.root, "toy", "v1", s3.storage_options)
    spool = tmp_path / "spool"
    spool.mkdir()
    for fmt in ("webdataset", "parquet"):
        writer = ShardWriter(
            store.child(fmt),
            ShardConfig(format=fmt, max_count=8),
            spool_dir=str(spool),
            memory_spool_bytes=memory_spool_bytes,
        )
        commit = writer.write_shard("shard-000000", (record_for(i) for i in items_for(3)))
        assert commit.count == 9 and commit.bytes > 4096
        assert verify_shard(store.child(fmt, "synthetic"), commit) == []
    # Small shards go up straight from memory; large ones spill to spool_dir, which is emptied after the upload.
    assert len(spills) == (0 if memory_spool_bytes > 4096 else 2)
    assert all(os.path.dirname(p) == str(spool) for p in spills) and list(spool.iterdir()) == []


def test_s3_lease_is_exclusive(s3: S3Env) -> None:  # noqa: F811
    store = version_store(s3.root, "toy", "v1", s3.storage_options)
    with VersionLease(store, owner="A", heartbeat=False):
        with pytest.raises(LeaseHeldError, match="build 'A'"):
            VersionLease(store, owner="B", heartbeat=False).acquire()
    assert VersionLease(store, owner="B", heartbeat=False).acquire().held


@pytest.mark.parametrize(
    "faulty_s3",
    [{"failure_rate": 0.25, "after_share": 0.4, "seed": 1}],
    indirect=True,
    ids=["fail25pct"],
)
def test_build_completes_through_retries_when_s3_fails_requests(faulty_s3: S3Env, s3: S3Env) -> None:  # noqa: F811
    store = version_store(faulty_s3.root, "toy", "v1", faulty_s3.storage_options)
    items = items_for(4)
    mini_build(store, items, ShardConfig(format="webdataset", max_count=3), workers=2)
    counts = faulty_s3.proxy.counts
    print(
        f"\nS3 fault injection: {counts.requests} requests, {counts.failed_before} failed before reaching the "
        f"server, {counts.failed_after} failed after the server acted"
    )
    assert counts.injected >= 5
    # Check the result through a clean connection to the same server.
    clean = version_store(f"s3://{faulty_s3.bucket}/{faulty_s3.prefix}", "toy", "v1", s3.storage_options)
    assert verify_version(clean) == []
    keys = read_index(clean).column("key").to_pylist()
    assert sorted(keys) == sorted(item_key(i) for i in items)


class KillingGateway(S3Interceptor):
    """Between the writer process and the S3 server: kills the writer (SIGKILL) when its PUT for the armed kill
    point arrives, before forwarding it (the object never lands) or once the server stored it (the writer never
    hears back). The request is seen, so the kill lands at that point and no other."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.lock = threading.Lock()
        self.arm(None)

    def arm(self, point: KillPoint | None) -> None:
        with self.lock:
            self.point, self.hits, self.reached, self.proc = point, 0, "", None

    def watch(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def _fire(self, method: str, path: str, when: str) -> bool:
        with self.lock:
            p = self.point
            if p is None or p.when != when or method != "PUT" or not re.search(p.target, unquote(path.split("?")[0])):
                return False
            self.hits += 1
            if self.hits != p.nth:
                return False
            assert self.proc is not None, "a writer request arrived before its process was known"
            os.kill(self.proc.pid, signal.SIGKILL)
            self.point, self.reached = None, p.name
            return True

    def decide(self, method: str, path: str, body: bytes):
        if self._fire(method, path, "before"):
            return "before", (503, "SlowDown", "the writer was killed")
        return "pass", None

    def acted(self, method: str, path: str) -> None:
        self._fire(method, path, "after")


@pytest.mark.slow
def test_kills_at_chosen_points_keep_exactly_once_on_s3(moto, tmp_path) -> None:  # noqa: F811
    root = f"s3://{BUCKET}/kill-{uuid.uuid4().hex[:10]}"
    with KillingGateway(moto.port) as gateway:
        store = kill_chain(root, s3_options(gateway.endpoint_url), "parquet", S3_KILLS, gateway)
        assert_same_as_uninterrupted(store, tmp_path, "parquet")


def test_an_object_written_by_another_process_after_a_listing_is_read(s3: S3Env) -> None:  # noqa: F811
    """s3fs answers size lookups from its listing cache; a whole-object read must not (one GET, no lookup)."""
    import s3fs

    store = version_store(s3.root, "toy", "v1", s3.storage_options)
    store.write_bytes(b"first", "synthetic", "_index", "a.parquet")
    assert store.listdir("synthetic", "_index") == ["a.parquet"]  # the listing is cached now
    other = s3fs.S3FileSystem(**{**s3.storage_options, "skip_instance_cache": True})  # another worker's client
    other.pipe_file(store.path("synthetic", "_index", "b.parquet"), b"second")
    assert store.read_bytes("synthetic", "_index", "b.parquet") == b"second"
    with pytest.raises(FileNotFoundError):
        store.read_bytes("synthetic", "_index", "c.parquet")


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_a_flipped_byte_in_a_remote_shard_fails_verification(s3: S3Env, fmt: str) -> None:  # noqa: F811
    store = version_store(s3.root, "toy", "v1", s3.storage_options)
    mini_build(store, items_for(2), ShardConfig(format=fmt, max_count=10))
    commit = committed_shards(store)[0]
    shard = store.child("synthetic")
    assert verify_shard(shard, commit) == []
    data = bytearray(shard.read_bytes(commit.files[0].path))
    first = next(iter_shard(shard, commit, check=True, checksum=True))  # stopped early: the helpers are joined
    data[data.index(first.image[100:132]) + 8] ^= 0xFF  # inside an image: the container still parses
    shard.write_bytes(bytes(data), commit.files[0].path)
    assert len(list(iter_shard(shard, commit, check=True))) == commit.count  # size and count still match
    assert any("sha256" in p for p in verify_shard(shard, commit))


def test_a_refused_index_part_upload_leaves_no_commit_and_no_file(moto) -> None:  # noqa: F811
    """The index part goes up on its own thread while the shard file does; its failure must still fail the shard,
    after both requests ended, and remove what the shard wrote."""
    import uuid

    from support.s3 import BUCKET, S3Interceptor, s3_options

    class RefuseIndexParts(S3Interceptor):
        refusing, refused = True, 0

        def decide(self, method: str, path: str, body: bytes):
            if self.refusing and method == "PUT" and "/synthetic/_index/" in path:
                self.refused += 1
                return "before", (403, "AccessDenied", "Access Denied")
            return "pass", None

    prefix = f"ix-{uuid.uuid4().hex[:10]}"
    with RefuseIndexParts(moto.port) as gateway:
        store = version_store(f"s3://{BUCKET}/{prefix}", "toy", "v1", s3_options(gateway.endpoint_url))
        writer = ShardWriter(store, ShardConfig(format="webdataset", max_count=10), backoff_s=0.01)
        with pytest.raises(PermissionError, match="_index/shard-000000.parquet"):
            writer.write_shard("shard-000000", (record_for(i) for i in items_for(2)))
        assert gateway.refused == 1  # a refusal is an answer: not retried
        clean = version_store(f"s3://{BUCKET}/{prefix}", "toy", "v1", s3_options(moto.endpoint_url))
        assert committed_shards(clean) == [] and partial_shards(clean) == []
        assert not clean.exists("synthetic", "shard-000000.tar")
        gateway.refusing = False
        commit = writer.write_shard("shard-000000", (record_for(i) for i in items_for(2)))
        assert verify_shard(clean.child("synthetic"), commit) == []


def test_verify_checks_shards_concurrently_on_s3(moto) -> None:  # noqa: F811
    """`realfake verify` of a version on an object store overlaps the shards' GETs (each takes a round trip):
    a gateway records how many shard GETs are in flight at once; when told to, it holds each until a second one
    arrives (observed, not timed: concurrent GETs meet there, and from then on none is held; a reader that never
    overlaps them gets each released after a minute, and fails)."""

    class HoldShardGets(S3Interceptor):
        in_flight, most, hold = 0, 0, False
        met = threading.Condition()

        def decide(self, method: str, path: str, body: bytes):
            if method == "GET" and "/synthetic/shard-" in path:
                with self.met:
                    self.in_flight += 1
                    self.most = max(self.most, self.in_flight)
                    self.met.notify_all()
                    if self.hold:
                        self.met.wait_for(lambda: self.most >= 2, timeout=60)
                    self.in_flight -= 1
            return "pass", None

    root = f"s3://{BUCKET}/vc-{uuid.uuid4().hex[:10]}"
    with HoldShardGets(moto.port) as gateway:
        opts = s3_options(gateway.endpoint_url)
        store = version_store(root, "toy", "v1", opts)
        mini_build(store, items_for(4), ShardConfig(format="parquet", max_count=3))
        assert len(committed_shards(store)) == 4
        gateway.most = 0
        assert verify_version(store.uri(), opts, workers=1) == []
        assert gateway.most == 1
        gateway.most, gateway.hold = 0, True
        assert verify_version(store.uri(), opts) == []  # the default: several at a time
        assert gateway.most >= 2, gateway.most
