"""Generation overlapped with shard writing (``synthesis.overlap_writes``): same output, failures contained.

The engine runs on a background thread up to two batches ahead of the writer. These tests build a miniature
version twice, with and without the overlap, and compare the committed shards byte for byte; then break the
run from each side: the engine (a real source image disappears mid-run) and the writer (the build's lease passes
to another build after the first commit). Either way the error reaches the caller, the shards committed before
it stay committed, and the generation thread is gone.
"""

from __future__ import annotations

import os
import re
import threading

import pytest
from conftest import mini_config

from realfake.build import store_of
from realfake.data.ingest import ingest
from realfake.data.shards import LeaseLostError, VersionLease, committed_shards
from realfake.synthesize import SynthesisEngine, plan_work, synthesize


def _prepared(root, tiny_base, digits_folder, **over):
    cfg = mini_config(str(root), tiny_base, digits_folder, finetune__enabled=False, guidance__enabled=False,
                      source__max_per_class=2, source__test_fraction=0.0,
                      synthesis={"steps": 2, "resolution": 32, "batch_size": 3, **over},
                      shards={"format": "webdataset", "image_format": "png", "max_count": 5})
    store = store_of(cfg)
    ingest(cfg.source, store)
    return cfg, store


def _generation_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "realfake-generate"]


@pytest.fixture(scope="module")
def engine_for(tmp_path_factory, tiny_base, digits_folder):
    """One resident engine (the tiny model loads once) reused by the runs of this module."""
    cfg, store = _prepared(tmp_path_factory.mktemp("engine"), tiny_base, digits_folder)
    return SynthesisEngine(cfg, store)


def _run(tmp_path, tiny_base, digits_folder, engine, **over):
    cfg, store = _prepared(tmp_path, tiny_base, digits_folder, **over)
    engine.cfg, engine.store, engine.max_batch = cfg, store, cfg.synthesis.batch_size
    return cfg, store


def test_overlap_writes_the_same_bytes_as_the_plain_loop(tmp_path, tiny_base, digits_folder, engine_for):
    shas = {}
    for overlap in (True, False):
        cfg, store = _run(tmp_path / str(overlap), tiny_base, digits_folder, engine_for, overlap_writes=overlap)
        out = synthesize(cfg, store, engine=engine_for)
        assert out["images"] == 20 and len(out["shards_written"]) == 4
        shas[overlap] = [(c.name, [f.sha256 for f in c.files]) for c in committed_shards(store)]
    assert shas[True] == shas[False]
    assert not _generation_threads()


def test_an_engine_error_mid_run_reaches_the_caller_and_keeps_earlier_shards(tmp_path, tiny_base, digits_folder,
                                                                             engine_for):
    cfg, store = _run(tmp_path, tiny_base, digits_folder, engine_for)
    items = plan_work(cfg, store)
    os.remove(items[12].uri)  # a source image of the third shard vanishes (e.g. a bucket lifecycle rule)
    with pytest.raises(FileNotFoundError, match=re.escape(items[12].uri)):  # the engine's own error, naming the file
        synthesize(cfg, store, engine=engine_for)
    assert [c.name for c in committed_shards(store)] == ["shard-000000", "shard-000001"]
    assert not _generation_threads()


def test_a_writer_error_stops_the_engine_thread(tmp_path, tiny_base, digits_folder, engine_for):
    cfg, store = _run(tmp_path, tiny_base, digits_folder, engine_for)
    lease = VersionLease(store, owner="build-A", heartbeat=False).acquire()

    def taken_over(name: str, count: int, seconds: float) -> None:
        store.remove("_lease.json")  # A's lease expired (it stopped renewing) and build B took the version
        VersionLease(store, owner="build-B", heartbeat=False).acquire()

    with pytest.raises(LeaseLostError, match="build-B"):
        synthesize(cfg, store, engine=engine_for, lease=lease, on_shard=taken_over)
    assert [c.name for c in committed_shards(store)] == ["shard-000000"]
    assert not _generation_threads()
