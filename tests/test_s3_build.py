"""A miniature realfake build end to end on S3: the real pipeline (ingest, guidance, LoRA fine-tuning, img2img
synthesis, shards, index, card) through s3fs against moto's server on loopback, then a resume that regenerates
nothing, then the loss of one commit record, which makes exactly that shard be rewritten.
"""

from __future__ import annotations

import pytest
from conftest import mini_config
from support.s3 import S3Env, moto, s3  # noqa: F401 - pytest fixtures

from realfake.data.card import verify_version  # bound before any patching: the test checks with the real one
from realfake.data.shards import COMMITS_DIR, committed_shards, read_index

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def _commit_blobs(store) -> dict[str, bytes]:
    """Commit record bytes by shard name (they carry a timestamp, so a rewrite changes them)."""
    s = store.child("synthetic")
    return {c.name: s.read_bytes(COMMITS_DIR, f"{c.name}.json") for c in committed_shards(store)}


def test_miniature_build_on_s3_resumes_and_rewrites_only_the_lost_shard(
    s3: S3Env,  # noqa: F811
    tiny_base: str,
    digits_folder: str,
) -> None:
    from realfake.build import build_version, store_of

    cfg = mini_config(s3.root, tiny_base, digits_folder)
    opts = s3.storage_options
    store = store_of(cfg, opts)
    assert store.uri().startswith(f"s3://{s3.bucket}/{s3.prefix}/")

    first = build_version(cfg, storage_options=opts)
    syn = first["synthesis"]
    assert syn["shards_total"] >= 2, "the miniature build must span several shards for the resume checks"
    assert len(syn["shards_written"]) == syn["shards_total"]
    assert verify_version(store.uri(), opts) == []
    # Everything landed in the bucket, nothing on local disk: the card, the index, the adapter, the lease released.
    for rel in (("dataset.json",), ("synthetic", "index.parquet"), ("real", "manifest.parquet")):
        assert store.exists(*rel), f"{store.uri(*rel)} missing"
    assert not store.exists("_lease.json")
    index = read_index(store).to_pylist()
    assert len(index) == syn["images"] > 0
    before = _commit_blobs(store)
    assert sorted(before) == sorted(syn["shards_written"])

    # Re-run: committed shards are skipped, adapters and guidance are reused, no commit record is touched.
    again = build_version(cfg, storage_options=opts)
    assert again["synthesis"]["shards_written"] == []
    assert all(a["skipped"] for a in again["adapters"])
    assert _commit_blobs(store) == before
    assert verify_version(store.uri(), opts) == []

    # Lose one commit record (a crash between upload and commit): only that shard is redone, the others stay.
    victim = sorted(before)[1]
    store.remove("synthetic", COMMITS_DIR, f"{victim}.json")
    store.fs.invalidate_cache()
    assert victim not in {c.name for c in committed_shards(store)}
    third = build_version(cfg, storage_options=opts)
    assert third["synthesis"]["shards_written"] == [victim]
    after = _commit_blobs(store)
    assert sorted(after) == sorted(before)
    assert {n: b for n, b in after.items() if n != victim} == {n: b for n, b in before.items() if n != victim}
    assert after[victim] != before[victim]  # a fresh commit (new timestamp)
    assert verify_version(store.uri(), opts) == []
    # The rewritten shard holds the same images for the same keys: seeds derive from the sample, not the run.
    rows = {r["key"]: (r["shard"], r["source_sample_id"], r["seed"]) for r in read_index(store).to_pylist()}
    assert rows == {r["key"]: (r["shard"], r["source_sample_id"], r["seed"]) for r in index}
