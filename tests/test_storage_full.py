"""Out of room while writing: a full disk, an exhausted quota or a size limit keeps the committed state and says
what to do.

On local disk the writer runs in a child process whose ``RLIMIT_FSIZE`` makes the kernel refuse every write past
a size (``EFBIG``, handled like ``ENOSPC``): a real refused write, without root or a loop mount. The limit is per
file, so the miniature build draws the images of its last class large: the first two shards fit, the third does
not. On S3 a gateway in front of moto's server keeps a byte quota on the test prefix and refuses a ``PUT`` that
would exceed it, answering as Ceph RGW (``403 QuotaExceeded``) or MinIO (``507 XMinioStorageFull``) do. Either
way the committed shards must verify, nothing of the failed shard may be left, the error must name the file, the
filesystem and the fix, and a re-run once there is room must finish the version.

Run as a script, this module is the size-limited writer process.
"""

from __future__ import annotations

import errno
import json
import pickle
import resource
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from support.s3 import BUCKET, S3Env, S3Interceptor, moto, s3_options  # noqa: F401 - moto is a pytest fixture
from test_shards import CLASSES, item_key, items_for, record_for

from realfake.config import ShardConfig
from realfake.data.card import verify_version, write_card
from realfake.data.shards import (
    ShardWriter,
    SyntheticRecord,
    VersionLease,
    committed_shards,
    partial_shards,
    plan_pending,
    read_index,
    verify_shard,
)
from realfake.data.storage import (
    StorageFullError,
    Store,
    describe_location,
    full_error,
    out_of_space,
    version_store,
)

ITEMS = items_for(4)  # 3 classes x 4 images, shards of 4: one shard per class
LIMIT = 64 << 10  # per file: a shard of small images fits, a shard of large ones does not


def record(it: tuple[int, str, int]) -> SyntheticRecord:
    """The shapes of test_shards, drawn at 32 px, except for the last class at 160 px (about 60 KB per PNG)."""
    return record_for(it, size=160 if it[0] == 2 else 32)


def build(store: Store, fmt: str) -> list[str]:
    """A miniature build: plan under the lease, write each pending shard, then the index and the card."""
    with VersionLease(store, ttl_s=60) as lease:
        plans = plan_pending(store, ITEMS, item_key, 4, lease=lease)
        writer = ShardWriter(store, ShardConfig(format=fmt, max_count=4, image_format="png"), lease=lease,
                             class_names=CLASSES, backoff_s=0.01)
        for plan in plans:
            writer.write_shard(plan.name, (record(i) for i in plan.items))
        write_card(store, {"dataset": "toy", "version": "v1"}, {"written": len(plans)})
    return [p.name for p in plans]


def writer_main(argv: list[str]) -> None:
    """The child: ``root format limit``; prints what it wrote, or the StorageFullError it met (exit code 3)."""
    root, fmt, limit = argv[0], argv[1], int(argv[2])
    if limit:
        # Python ignores SIGXFSZ, so a write past the soft limit fails with EFBIG instead of killing the process.
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    store = version_store(root, "toy", "v1")
    try:
        written = build(store, fmt)
    except StorageFullError as e:
        print(json.dumps({"type": type(e).__name__, "kind": e.kind, "error": str(e),
                          "is_oserror": isinstance(e, OSError)}))
        sys.exit(3)
    print(json.dumps({"written": written}))


def run_writer(root: str, fmt: str, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, __file__, root, fmt, str(limit)], capture_output=True, text=True,
                          timeout=300)


def tmp_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if ".tmp-" in p.name)


# --------------------------------------------------------------------------------------------------------
# Local disk: a real refused write (RLIMIT_FSIZE in a child process)
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_file_size_limit_mid_build_keeps_committed_shards_and_the_rerun_completes(tmp_path: Path, fmt: str) -> None:
    root = tmp_path / "out"
    proc = run_writer(str(root), fmt, LIMIT)
    assert proc.returncode == 3, f"the writer should have met the limit:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    err = json.loads(proc.stdout)
    store = version_store(str(root), "toy", "v1")
    ext = "tar" if fmt == "webdataset" else "parquet"

    # The first two shards committed and verify; nothing of the third is left, not even a temp file.
    before = committed_shards(store)
    assert [c.name for c in before] == ["shard-000000", "shard-000001"]
    assert all(verify_shard(store.child("synthetic"), c) == [] for c in before)
    assert partial_shards(store) == [] and tmp_files(root) == []
    assert not store.exists("synthetic", f"shard-000002.{ext}")

    # The message: the file, the filesystem (mount point, free space), the cause and the fix.
    msg = err["error"]
    assert err["type"] == "StorageFullError" and err["kind"] == "file size" and err["is_oserror"]
    assert msg.startswith(f"cannot write shard shard-000002 ({store.uri('synthetic', f'shard-000002.{ext}')}) on "
                          "the local filesystem mounted at /")
    assert " free of " in msg and "file larger than this process or the filesystem allows" in msg
    assert "File too large" in msg and "ulimit -f" in msg
    assert "Shard shard-000002 was not committed" in msg and "shards committed earlier are intact" in msg
    assert msg.endswith("then re-run the same command: committed shards are kept and skipped.")

    # With room again, the same build writes only the missing shard and the version is whole.
    again = run_writer(str(root), fmt, 0)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout) == {"written": ["shard-000002"]}
    after = {c.name: (c.sha256, c.committed_at) for c in committed_shards(store)}
    assert {c.name: (c.sha256, c.committed_at) for c in before} == {k: after[k] for k in ("shard-000000",
                                                                                         "shard-000001")}
    assert verify_version(store) == []
    assert sorted(read_index(store).column("key").to_pylist()) == sorted(item_key(i) for i in ITEMS)


def test_whole_object_write_past_the_limit_keeps_the_previous_content(tmp_path: Path) -> None:
    root = tmp_path / "store"
    code = (
        "import json, resource, sys\n"
        "from realfake.data.storage import Store, StorageFullError\n"
        f"store = Store({str(root)!r})\n"
        "store.write_json({'version': 1}, 'dataset.json')\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "try:\n"
        "    store.write_json({'pad': 'x' * 200_000}, 'dataset.json')\n"
        "except StorageFullError as e:\n"
        "    print(json.dumps({'kind': e.kind, 'error': str(e)})); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    err = json.loads(proc.stdout)
    assert err["kind"] == "file size"
    assert err["error"].startswith(f"cannot write {root / 'dataset.json'} on the local filesystem mounted at /")
    assert ": file larger than this process or the filesystem allows (OSError: [Errno 27]" in err["error"]
    assert "Nothing was replaced" in err["error"] and "then re-run the same command." in err["error"]
    assert json.loads((root / "dataset.json").read_text()) == {"version": 1}
    assert tmp_files(root) == []


def test_out_of_space_reads_errno_and_object_store_codes_through_wrapping() -> None:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("writer failed") from inner
    except RuntimeError as outer:
        assert out_of_space(outer) == "space"
    assert out_of_space(OSError(errno.EDQUOT, "Disk quota exceeded")) == "quota"
    assert out_of_space(OSError(errno.EFBIG, "File too large")) == "file size"
    assert out_of_space(OSError(errno.EIO, "Input/output error")) is None
    assert out_of_space(PermissionError(errno.EACCES, "denied")) is None


def test_a_store_full_error_quotes_the_refusal_once_and_survives_pickling(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as refusal:
            raise full_error("cannot write a", "disk", "space", refusal, "Kept.", "then re-run") from refusal
    except StorageFullError as inner:
        outer = full_error("cannot write shard s", describe_location(store, "x"), "space", inner, "Kept.", "re-run")
    assert str(outer).startswith("cannot write shard s on the local filesystem mounted at /")
    assert "no space left (OSError: [Errno 28] No space left on device). Kept. Free space there, re-run." in str(outer)
    assert "cannot write a" not in str(outer)
    # a worker process hands it back to its parent pickled (multiprocessing, Prefect's stored states)
    back = pickle.loads(pickle.dumps(outer))
    assert type(back) is StorageFullError and back.kind == "space" and str(back) == str(outer)


# --------------------------------------------------------------------------------------------------------
# S3: a gateway that enforces a byte quota on the prefix
# --------------------------------------------------------------------------------------------------------
class QuotaGateway(S3Interceptor):
    """An HTTP proxy to an S3 server that refuses any ``PUT`` that would take the stored bytes under ``prefix``
    above ``quota`` (None: no quota). Object sizes are tracked per key, so overwriting an object (a lease renewal)
    counts once, and a ``DELETE`` gives its bytes back.

    Args:
        upstream_port: Port of the S3 server on 127.0.0.1.
        prefix: ``/{bucket}/{prefix}`` path the quota applies to.
        quota: Bytes allowed under the prefix.
        style: ``ceph`` answers ``403 QuotaExceeded``; ``minio`` answers ``507 XMinioStorageFull``.
    """

    ANSWERS = {
        "ceph": (403, "QuotaExceeded", "Quota exceeded."),
        "minio": (507, "XMinioStorageFull", "Storage backend has reached its minimum free drive threshold."),
    }

    def __init__(self, upstream_port: int, prefix: str, quota: int | None, style: str) -> None:
        self.prefix, self.quota, self.style = prefix, quota, style
        self.sizes: dict[str, int] = {}
        self.refused: list[str] = []
        self.lock = threading.Lock()
        super().__init__(upstream_port)

    def decide(self, method: str, path: str, body: bytes) -> tuple[str, tuple[int, str, str] | None]:
        return ("pass", None) if self._admit(method, path, len(body)) else ("before", self.ANSWERS[self.style])

    def _admit(self, method: str, path: str, size: int) -> bool:
        key = path.split("?", 1)[0]
        if not key.startswith(self.prefix):
            return True
        with self.lock:
            if method == "PUT" and "uploadId=" not in path:
                total = sum(self.sizes.values()) - self.sizes.get(key, 0) + size
                if self.quota is not None and total > self.quota:
                    self.refused.append(key)
                    return False
                self.sizes[key] = size
            elif method == "DELETE":
                self.sizes.pop(key, None)
        return True


@pytest.mark.s3
@pytest.mark.parametrize("style", ["ceph", "minio"])
def test_s3_quota_mid_build_keeps_committed_shards_and_the_rerun_completes(moto, style: str) -> None:  # noqa: F811
    prefix = f"q-{uuid.uuid4().hex[:10]}"
    with QuotaGateway(moto.port, f"/{BUCKET}/{prefix}/", quota=100_000, style=style) as gateway:
        env = S3Env(gateway.endpoint_url, BUCKET, prefix, s3_options(gateway.endpoint_url))
        store = version_store(env.root, "toy", "v1", env.storage_options)
        with pytest.raises(StorageFullError) as err:
            build(store, "webdataset")
        # refused once: a quota is not retried
        assert gateway.refused == [f"/{BUCKET}/{prefix}/toy/v1/synthetic/shard-000002.tar"]

        clean = version_store(env.root, "toy", "v1", s3_options(moto.endpoint_url))
        before = committed_shards(clean)
        assert [c.name for c in before] == ["shard-000000", "shard-000001"]
        assert all(verify_shard(clean.child("synthetic"), c) == [] for c in before)
        assert partial_shards(clean) == [] and not clean.exists("synthetic", "shard-000002.tar")

        msg = str(err.value)
        assert isinstance(err.value, OSError) and err.value.kind == ("quota" if style == "ceph" else "space")
        assert msg.startswith(f"cannot write shard shard-000002 (s3://{BUCKET}/{prefix}/toy/v1/synthetic/"
                              f"shard-000002.tar) on the s3 bucket '{BUCKET}' at {gateway.endpoint_url}: ")
        code = QuotaGateway.ANSWERS[style][1]
        reason = "quota exceeded" if style == "ceph" else "no space left"
        assert f": {reason} (OSError: [Errno 5] An error occurred ({code}) when calling the PutObject" in msg
        assert ("Raise the quota" if style == "ceph" else "Free space there") in msg
        assert "committed shards are kept and skipped" in msg and "testing" not in msg  # no credential

        # The lease of the failed build is gone (released on the way out); raise the quota and re-run.
        gateway.quota = None
        assert build(store, "webdataset") == ["shard-000002"]
        after = {c.name: c.sha256 for c in committed_shards(clean)}
        assert {c.name: c.sha256 for c in before} == {k: after[k] for k in ("shard-000000", "shard-000001")}
        assert verify_version(clean) == []


if __name__ == "__main__":
    writer_main(sys.argv[1:])
