"""The factory's own work at scale, on loopback S3: exactly-once and requests that grow linearly.

The largest build of benchmarks/scale.py that fits the test budget: the real ``synthesize`` flow (preflight,
version lease, plan task, 16 shard-group task runs under a 16-slot concurrency limit, progress artifact, finalize,
verify) on 2,000 and then 10,000 images of 1,000 classes, 1,000 images per shard, written through s3fs to moto's
S3 server behind a relay that counts every request. The generator is the benchmark's null engine
(``SynthesisEngine``'s interface, 8x8 images), so what is counted is the factory's own work.

Asserted: every planned image is in the index exactly once and every planned shard is committed; storage
requests per shard at 10,000 images stay within 1.5x of those at 2,000 (linear growth in total); and a progress
poll with every shard committed costs the same number of requests at both sizes (it re-read every commit record
before, so its cost grew with the number of shards).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support.s3 import BUCKET, MotoServer, moto  # noqa: F401 - pytest fixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scale import (  # noqa: E402 - the repository root first
    STORAGE,
    NullEngine,
    load_cfg,
    scale_overrides,
    start_counting_relay,
    total,
    write_source,
)

pytestmark = [pytest.mark.s3, pytest.mark.slow]

GROUPS = 16


def _build(n: int, endpoint: str, run: str) -> dict:
    """One synthesize flow run of ``n`` images in :data:`GROUPS` groups; requests counted at the relay."""
    from flows.params import FanoutParams, SynthesizeParams
    from flows.synthesize import _progress_counter, synthesize_flow
    from realfake.build import plan_synthesis, store_of
    from realfake.data.shards import committed_shards, read_index
    from tasks.gpu import ensure_gpu_limit

    overrides = scale_overrides(f"s3://{BUCKET}/scale-{run}", f"n{n}", endpoint)
    cfg = load_cfg(overrides)
    write_source(cfg, n)
    ensure_gpu_limit(f"scale-{run}", GROUPS)
    # poll_seconds at its maximum: no poll lands mid-run, so the counts do not depend on the machine's speed
    params = SynthesizeParams(preset="demo", overrides=overrides, fanout=FanoutParams(
        groups=GROUPS, gpu_limit=f"scale-{run}", poll_seconds=600))
    before = STORAGE.snapshot()
    summary = synthesize_flow(params)  # finalize and verify included: verify raises on any problem
    requests = total(STORAGE.since(before))
    names = plan_synthesis(cfg)
    store = store_of(cfg)
    keys = read_index(store).column("key").to_pylist()
    poll = _progress_counter(cfg, names)
    poll()  # the first poll of a counter reads what is new to it; the next ones are a build's steady state
    before = STORAGE.snapshot()
    done = poll()
    poll_requests = total(STORAGE.since(before))
    return {"summary": summary, "names": names, "keys": keys, "committed": [c.name for c in committed_shards(store)],
            "requests": requests, "poll_requests": poll_requests, "done": done}


def test_ten_thousand_images_in_16_groups_on_s3_once_each_with_linear_requests(
    moto: MotoServer,  # noqa: F811
    harness,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    import realfake.synthesize

    monkeypatch.setattr(realfake.synthesize, "SynthesisEngine", NullEngine)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    relay = start_counting_relay(moto.port)
    try:
        small = _build(2_000, relay.endpoint_url, tmp_path.name + "-a")
        large = _build(10_000, relay.endpoint_url, tmp_path.name + "-b")
    finally:
        relay.stop()

    for n, run in ((2_000, small), (10_000, large)):
        assert len(run["names"]) == n // 1000
        assert run["committed"] == run["names"], "every planned shard committed, no other"
        assert len(run["keys"]) == n and len(set(run["keys"])) == n, "every planned image exactly once"
        assert run["summary"]["shards"] == n // 1000 and run["summary"]["images"] == n
        assert run["done"] == (n // 1000, n)
    per_shard_small = small["requests"] / len(small["names"])
    per_shard_large = large["requests"] / len(large["names"])
    assert per_shard_large <= 1.5 * per_shard_small, (
        f"storage requests per shard grew from {per_shard_small:.1f} at 2,000 images to {per_shard_large:.1f} at "
        "10,000: the factory's requests grow faster than the number of shards")
    assert large["poll_requests"] == small["poll_requests"], (
        f"a progress poll costs {small['poll_requests']} requests with 2 shards committed and "
        f"{large['poll_requests']} with 10: its cost grows with the build")


def test_a_shard_groups_plan_removes_only_its_own_leftovers(tmp_path: Path) -> None:
    """Shard groups of one build plan concurrently with the others' writes: a group's plan must remove the
    leftovers of its own shards only, never another group's file in flight (a temp file, a published part not
    yet committed, an index part). benchmarks/scale.py found 8 of 10 concurrent local groups failing because
    each group's plan deleted the others' temp files. The build's own plan (no shard names) still removes all."""
    from realfake.data.shards import plan_pending
    from realfake.data.storage import Store

    store = Store(str(tmp_path / "v1"))
    folder = tmp_path / "v1" / "synthetic"
    (folder / "_index").mkdir(parents=True)
    theirs = [folder / "shard-000000.tar.tmp-0a1b2c3d", folder / "shard-000000.tar", folder / "_index" /
              "shard-000000.parquet"]
    ours = [folder / "shard-000001.tar.tmp-4e5f6a7b", folder / "shard-000001-1.tar", folder / "_index" /
            "shard-000001.parquet"]
    for p in theirs + ours:
        p.write_bytes(b"partial")
    items = [f"k{i}" for i in range(4)]

    pending = plan_pending(store, items, key=str, max_count=2, shards=["shard-000001"])

    assert [p.name for p in pending] == ["shard-000000", "shard-000001"]
    assert all(p.exists() for p in theirs), "another group's files in flight were removed"
    assert not any(p.exists() for p in ours), "the group's own leftovers were kept"
    plan_pending(store, items, key=str, max_count=2)  # the build's plan, before any group starts
    assert not any(p.exists() for p in theirs)
