"""Tests of realfake.data.shards on the local filesystem: formats, commit protocol, planning modes, lease.

The helpers at the top (``record_for``, ``mini_build``) are a miniature synthesis build: deterministic
drawings stand in for generated images (the generator is not under test). Run as a script, this module is
the writer process that the crash tests kill with SIGKILL.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from realfake.config import ShardConfig
from realfake.data.card import verify_version, write_card
from realfake.data.shards import (
    COMMITS_DIR,
    LEASE_FILE,
    CommitRecord,
    LeaseHeldError,
    LeaseLostError,
    ShardExistsError,
    ShardIntegrityError,
    ShardWriter,
    SyntheticRecord,
    VersionLease,
    committed_keys,
    committed_shards,
    encode_image,
    iter_shard,
    iter_synthetic,
    make_key,
    partial_shards,
    plan_pending,
    plan_shards,
    read_index,
    verify_shard,
    write_index,
)
from realfake.data.storage import Store, version_store

CLASSES = ["circle", "square", "triangle"]


# ---------------------------------------------------------------------------------------------------------
# A miniature build
# ---------------------------------------------------------------------------------------------------------
def items_for(n_per_class: int, classes: int = 3, replicas: int = 1) -> list[tuple[int, str, int]]:
    """(label, source_sample_id, replica) work items, sorted by key like the synthesis stage sorts them."""
    items = [(c, f"real.{c}/{j:03d}", r) for c in range(classes) for j in range(n_per_class) for r in range(replicas)]
    return sorted(items, key=lambda it: make_key(*it))


def item_key(it: tuple[int, str, int]) -> str:
    return make_key(*it)


def record_for(it: tuple[int, str, int], size: int = 32) -> SyntheticRecord:
    """A deterministic drawing for one work item: its class's shape on a seeded background."""
    label, source, replica = it
    seed = int(hashlib.sha256(f"{source}:{replica}".encode()).hexdigest()[:8], 16)
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((size, size, 3)) * 80).astype("uint8"))
    d = ImageDraw.Draw(img)
    color = tuple(int(x) for x in rng.integers(120, 255, 3))
    a, b = size // 5, size - size // 5
    if label % 3 == 0:
        d.ellipse([a, a, b, b], fill=color)
    elif label % 3 == 1:
        d.rectangle([a, a, b, b], fill=color)
    else:
        d.polygon([(size // 2, a), (a, b), (b, b)], fill=color)
    meta = {
        "source_sample_id": source,
        "replica": replica,
        "prompt": f"photo of {CLASSES[label % 3]}",
        "negative_prompt": "distorted, unrealistic, blurry, out of frame",
        "seed": seed,
        "sampler": {"scheduler": "unipc", "steps": 30, "strength": 0.75, "guidance_scale": 2.0},
        "base_model": "tiny-sd",
        "base_model_hash": "0" * 64,
        "adapter_hash": "1" * 64,
    }
    return SyntheticRecord(make_key(*it), label, CLASSES[label % 3], img, meta)


def mini_build(
    store: Store,
    items: Sequence[tuple[int, str, int]],
    cfg: ShardConfig,
    mode: str = "resume",
    workers: int = 1,
    reverse: bool = False,
    delay_s: float = 0.0,
    owner: str | None = None,
    on_record: Callable[[], None] | None = None,
) -> list[CommitRecord]:
    """Plan, write every pending shard with ``workers`` threads, then write the index and the card.

    ``on_record`` is called before each record is made (the crash tests kill the writer there)."""
    with VersionLease(store, owner=owner, ttl_s=60) as lease:
        plans = plan_pending(store, items, item_key, cfg.max_count, mode=mode, lease=lease)
        if reverse:
            plans = plans[::-1]
        writer = ShardWriter(store, cfg, lease=lease, class_names=CLASSES, backoff_s=0.05)

        def records(plan):
            for it in plan.items:
                if on_record is not None:
                    on_record()
                if delay_s:
                    time.sleep(delay_s)
                yield record_for(it)

        with ThreadPoolExecutor(workers) as ex:
            commits = list(ex.map(lambda p: writer.write_shard(p.name, records(p)), plans))
        write_card(store, {"dataset": "toy", "version": "v1", "shards": cfg.model_dump()}, {"written": len(commits)})
    return commits


def index_signature(store: Store) -> list[tuple]:
    t = read_index(store).select(["key", "shard", "label", "image_sha256", "meta"])
    return [tuple(r.values()) for r in t.to_pylist()]


def shard_hashes(store: Store) -> dict[str, str]:
    return {c.name: c.sha256 for c in committed_shards(store)}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return version_store(str(tmp_path / "out"), "toy", "v1")


# ---------------------------------------------------------------------------------------------------------
# Keys, plans, encoding
# ---------------------------------------------------------------------------------------------------------
def test_make_key_has_no_dots_and_keeps_distinct_ids_distinct() -> None:
    a, b = make_key(3, "img.001/x", 0), make_key(3, "img-001-x", 0)
    assert "." not in a and "/" not in a and a.startswith("0003_")
    assert a != b
    assert make_key(3, "plain_id", 2) == "0003_plain_id_2"


def test_plan_shards_is_deterministic_and_complete() -> None:
    items = list(range(23))
    plans = plan_shards(items, 5)
    assert [p.name for p in plans] == [f"shard-{i:06d}" for i in range(5)]
    assert [len(p.items) for p in plans] == [5, 5, 5, 5, 3]
    assert [x for p in plans for x in p.items] == items
    assert plan_shards(items, 5) == plans
    assert plan_shards(items, 5, start=7)[0].name == "shard-000007"
    with pytest.raises(ValueError, match="max_count"):
        plan_shards(items, 0)


@pytest.mark.parametrize("fmt", ["jpg", "png", "webp"])
def test_encode_image_formats_round_trip(fmt: str) -> None:
    img = record_for((1, "a", 0)).image
    data = encode_image(img, fmt, 90)
    back = Image.open(io.BytesIO(data))
    assert back.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt] and back.size == img.size
    assert encode_image(data, fmt) == data  # pre-encoded bytes pass through unchanged
    with pytest.raises(ValueError, match="not"):
        encode_image(data, "png" if fmt != "png" else "jpg")


# ---------------------------------------------------------------------------------------------------------
# Formats and standard readers
# ---------------------------------------------------------------------------------------------------------
def test_webdataset_layout_is_read_by_webdataset_unchanged(store: Store) -> None:
    import webdataset as wds

    cfg = ShardConfig(format="webdataset", image_format="png", max_count=4)
    items = items_for(3)
    mini_build(store, items, cfg)
    folder = store.path("synthetic")
    first = sorted(Path(folder).glob("shard-*.tar"))[0]
    with tarfile.open(first) as tar:
        names = tar.getnames()
    key = item_key(items[0])
    assert names[:3] == [f"{key}.png", f"{key}.cls", f"{key}.json"]

    info = json.loads(Path(folder, "_info.json").read_text())
    split = info["splits"]["train"]
    assert split["num_samples"] == len(items) and sum(split["shard_lengths"]) == len(items)
    urls = [os.path.join(folder, f) for f in split["filenames"]]
    got = {s["__key__"]: (int(s["cls"]), json.loads(s["json"])) for s in wds.WebDataset(urls, shardshuffle=False)}
    assert set(got) == {item_key(i) for i in items}
    for it in items:
        label, meta = got[item_key(it)]
        assert label == it[0] and meta["source_sample_id"] == it[1] and meta["sampler"]["steps"] == 30


def test_parquet_shards_load_with_datasets_typed_features(store: Store, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    cfg = ShardConfig(format="parquet", image_format="webp", max_count=4)
    items = items_for(3)
    mini_build(store, items, cfg)
    ds = datasets.load_dataset(
        "parquet", data_files=store.path("synthetic", "shard-*.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds.features["label"], datasets.ClassLabel) and ds.features["label"].names == CLASSES
    assert ds.num_rows == len(items)
    row = ds[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (32, 32)
    by_key = {item_key(i): i for i in items}
    assert {r["key"] for r in ds} == set(by_key)
    assert all(r["label"] == by_key[r["key"]][0] and r["source_sample_id"] == by_key[r["key"]][1] for r in ds)


@pytest.mark.slow
def test_timm_trains_one_step_through_its_own_wds_reader(store: Store) -> None:
    import timm
    import torch
    from timm.data import create_dataset
    from torchvision import transforms

    torch.set_num_threads(1)
    cfg = ShardConfig(format="webdataset", image_format="jpg", max_count=5)
    items = items_for(4)
    mini_build(store, items, cfg)
    ds = create_dataset("wds/synthetic", root=store.path("synthetic"), split="train", is_training=True, batch_size=4)
    assert len(ds) == len(items)  # num_samples came from our _info.json
    ds.transform = transforms.ToTensor()
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=0)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 1, 2}
    model = timm.create_model("resnet10t", num_classes=len(CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_iter_synthetic_returns_every_committed_image(store: Store) -> None:
    cfg = ShardConfig(format="parquet", max_count=4)
    items = items_for(3)
    mini_build(store, items, cfg)
    got = [(meta["key"], label, img.size) for img, label, meta in iter_synthetic(store)]
    assert sorted(got) == sorted((item_key(i), i[0], (32, 32)) for i in items)


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_max_bytes_splits_a_shard_into_files_that_respect_it(store: Store, fmt: str) -> None:
    limit = 24_000
    cfg = ShardConfig(format=fmt, image_format="png", max_count=12, max_bytes=limit)
    items = items_for(4)
    commits = mini_build(store, items, cfg)
    assert sum(c.count for c in commits) == len(items)
    files = [f for c in commits for f in c.files]
    assert len(files) > len(commits)  # the limit forced extra files
    assert all(f.bytes <= limit for f in files)
    assert verify_version(store) == []
    assert sorted(m["key"] for _, _, m in iter_synthetic(store)) == sorted(item_key(i) for i in items)


# ---------------------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_one_worker_and_three_workers_in_any_order_give_identical_results(tmp_path: Path, fmt: str) -> None:
    cfg = ShardConfig(format=fmt, max_count=3)
    items = items_for(4)
    a = version_store(str(tmp_path / "a"), "toy", "v1")
    b = version_store(str(tmp_path / "b"), "toy", "v1")
    mini_build(a, items, cfg, workers=1)
    mini_build(b, items, cfg, workers=3, reverse=True)
    assert index_signature(a) == index_signature(b)
    assert shard_hashes(a) == shard_hashes(b)  # byte-identical shard files


# ---------------------------------------------------------------------------------------------------------
# Commit protocol
# ---------------------------------------------------------------------------------------------------------
def test_uncommitted_and_truncated_shards_are_never_read(store: Store) -> None:
    cfg = ShardConfig(format="webdataset", max_count=3)
    items = items_for(2)
    mini_build(store, items, cfg)
    plans = plan_shards(items, 3)
    victim = plans[-1].name
    tar = Path(store.path("synthetic", f"{victim}.tar"))
    data = tar.read_bytes()
    # Simulate a crash between writing the data and the commit: drop the commit, truncate the file.
    Path(store.path("synthetic", COMMITS_DIR, f"{victim}.json")).unlink()
    tar.write_bytes(data[: len(data) // 2])
    keys = {m["key"] for _, _, m in iter_synthetic(store)}
    assert keys == {item_key(i) for p in plans[:-1] for i in p.items}
    assert f"{victim}.tar" in partial_shards(store)
    problems = verify_version(store)
    assert any("uncommitted" in p for p in problems) and any("num_images" in p for p in problems)
    # Resume redoes only the victim and leaves the other shards untouched.
    before = {c.name: c.committed_at for c in committed_shards(store)}
    commits = mini_build(store, items, cfg)
    assert [c.name for c in commits] == [victim]
    assert {c.name: c.committed_at for c in committed_shards(store) if c.name != victim} == before
    assert tar.read_bytes() == data
    assert verify_version(store) == []


def test_committed_shard_is_not_rewritten_and_corruption_is_detected(store: Store) -> None:
    cfg = ShardConfig(format="webdataset", max_count=10)
    items = items_for(2)
    mini_build(store, items, cfg)
    writer = ShardWriter(store, cfg)
    assert writer.is_committed("shard-000000", verify=True)
    with pytest.raises(ShardExistsError, match="already committed"):
        writer.write_shard("shard-000000", [record_for(items[0])])
    tar = Path(store.path("synthetic", "shard-000000.tar"))
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF  # same size, one flipped byte inside the first image
    tar.write_bytes(bytes(data))
    assert writer.is_committed("shard-000000") and not writer.is_committed("shard-000000", verify=True)
    assert any("sha256" in p for p in verify_version(store))
    writer.write_shard("shard-000000", (record_for(i) for i in items), replace=True)
    assert verify_version(store) == []  # the rewrite is byte-identical, so the card matches again
    assert writer.is_committed("shard-000000", verify=True)


def test_a_missing_index_part_is_reported_with_the_fix_and_the_fix_works(store: Store) -> None:
    cfg = ShardConfig(format="parquet", max_count=2)
    items = items_for(2)
    mini_build(store, items, cfg)
    before = index_signature(store)
    commit = next(c for c in committed_shards(store) if c.name == "shard-000001")
    os.remove(store.path("synthetic", commit.index_part))
    for call in (lambda: write_index(store), lambda: mini_build(store, items, cfg)):
        with pytest.raises(ShardIntegrityError) as err:
            call()
        msg = str(err.value)
        assert commit.index_part in msg and f"{COMMITS_DIR}/shard-000001.json" in msg and "delete" in msg
    assert any("index part" in p for p in verify_version(store))
    os.remove(store.path("synthetic", COMMITS_DIR, "shard-000001.json"))  # what the message says to do
    mini_build(store, items, cfg)
    assert index_signature(store) == before and verify_version(store) == []


def test_a_flipped_byte_in_a_local_parquet_shard_fails_the_verifying_read(store: Store) -> None:
    cfg = ShardConfig(format="parquet", max_count=10)
    mini_build(store, items_for(2), cfg)
    commit = committed_shards(store)[0]
    shard = store.child("synthetic")
    first = next(iter_shard(shard, commit, check=True, checksum=True))  # stopped early: the helper is joined
    path = Path(store.path("synthetic", commit.files[0].path))
    data = bytearray(path.read_bytes())
    at = data.index(first.image[100:132]) + 8  # inside the first image's bytes: the file still parses
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    assert len(list(iter_shard(shard, commit, check=True))) == commit.count  # size and count still match
    with pytest.raises(ShardIntegrityError, match="sha256"):
        list(iter_shard(shard, commit, check=True, checksum=True))
    assert any("sha256" in p for p in verify_shard(shard, commit))


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_a_committed_local_shard_cut_short_yields_nothing(store: Store, fmt: str) -> None:
    """A committed file that lost its tail afterwards (a disk fault, a bad copy) is never read as data: its size is
    checked against the commit record before the first sample (the Parquet shard through its memory map)."""
    mini_build(store, items_for(2), ShardConfig(format=fmt, max_count=10))
    commit = committed_shards(store)[0]
    shard = store.child("synthetic")
    path = Path(store.path("synthetic", commit.files[0].path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 700])
    for checksum in (False, True):
        samples = iter_shard(shard, commit, check=True, checksum=checksum)
        with pytest.raises(ShardIntegrityError, match=f"has {len(data) - 700} bytes, its commit record says"):
            next(samples)
    assert any("commit record says" in p for p in verify_shard(shard, commit))
    path.write_bytes(data)
    assert verify_shard(shard, commit) == []


def test_tar_shards_are_byte_identical_to_what_tarfile_writes(store: Store) -> None:
    # The writer builds ustar headers itself (tarfile's are slow); the archive must not change by a byte.
    # One key is long enough (> 100 bytes with its extension) to need tarfile's own PAX header.
    recs = [record_for(it) for it in items_for(2)]
    long_key = "0002_" + "x" * 100 + "_0"
    recs.append(SyntheticRecord(long_key, 2, CLASSES[2], recs[0].image, {"source_sample_id": "x" * 100}))
    cfg = ShardConfig(format="webdataset", image_format="png", max_count=100)
    commit = ShardWriter(store, cfg).write_shard("shard-000000", recs)
    ours = Path(store.path("synthetic", "shard-000000.tar")).read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for r in recs:
            meta = json.dumps(
                {**r.meta, "key": r.key, "label": r.label, "class_name": r.class_name},
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=False,
            ).encode()
            for name, data in (
                (f"{r.key}.png", encode_image(r.image, "png")),
                (f"{r.key}.cls", str(r.label).encode()),
                (f"{r.key}.json", meta),
            ):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data),
                    946684800,
                    0o644,
                    0,
                    0,
                    "",
                    "",
                )
                tar.addfile(info, io.BytesIO(data))
    assert ours == buf.getvalue()
    assert commit.sha256 == hashlib.sha256(ours).hexdigest() and commit.bytes == len(ours)
    index = pq.read_table(store.path("synthetic", commit.index_part)).to_pylist()
    want = [hashlib.sha256(encode_image(r.image, "png")).hexdigest() for r in recs]
    assert [r["image_sha256"] for r in index] == want


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
@pytest.mark.parametrize("durable", [True, False])
def test_durable_controls_every_fsync_of_a_shard(store: Store, monkeypatch, fmt: str, durable: bool) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    cfg = ShardConfig(format=fmt, max_count=100)
    ShardWriter(store, cfg, durable=durable).write_shard("shard-000000", [record_for(i) for i in items_for(2)])
    # durable: the shard file, its index part and its commit record; otherwise none (process-crash safe only).
    assert len(synced) == (3 if durable else 0)
    assert verify_shard(store.child("synthetic"), committed_shards(store)[0]) == []


def test_a_failing_destination_leaves_no_commit_and_no_file(store: Store, monkeypatch) -> None:
    class Full(io.BytesIO):
        def write(self, b):  # noqa: ANN001
            raise OSError(28, "No space left on device")

    writer = ShardWriter(store, ShardConfig(format="webdataset", max_count=100))
    opened: list[str] = []

    def open_full(rel: str):  # noqa: ANN202
        opened.append(rel)
        return Full(), ""

    monkeypatch.setattr(writer, "_open_dest", open_full)
    with pytest.raises(OSError, match="No space left"):
        writer.write_shard("shard-000000", (record_for(i) for i in items_for(2)))
    assert opened and committed_shards(store) == [] and partial_shards(store) == []


def test_bad_records_fail_before_anything_is_committed(store: Store) -> None:
    writer = ShardWriter(store, ShardConfig(max_count=10))
    rec = record_for((0, "a", 0))
    with pytest.raises(ValueError, match="no dots"):
        writer.write_shard("shard-000000", [SyntheticRecord("a.b", 0, "x", rec.image, {})])
    with pytest.raises(ValueError, match="duplicate"):
        writer.write_shard("shard-000000", [rec, rec])
    with pytest.raises(ValueError, match="no records"):
        writer.write_shard("shard-000000", [])
    assert committed_shards(store) == [] and partial_shards(store) == []


# ---------------------------------------------------------------------------------------------------------
# Incremental modes
# ---------------------------------------------------------------------------------------------------------
def test_extend_adds_images_and_classes_without_touching_committed_shards(store: Store) -> None:
    cfg = ShardConfig(format="webdataset", max_count=4)
    small = items_for(3, classes=2)
    mini_build(store, small, cfg)
    first = {c.name: (c.sha256, c.committed_at) for c in committed_shards(store)}
    bigger = items_for(3, classes=3, replicas=2)  # a new class and a second replica per source
    with pytest.raises(ValueError, match="mode='extend'"):
        mini_build(store, bigger, cfg, mode="resume")
    added = mini_build(store, bigger, cfg, mode="extend")
    assert {c.name: (c.sha256, c.committed_at) for c in committed_shards(store) if c.name in first} == first
    assert min(c.name for c in added) > max(first)
    keys = read_index(store).column("key").to_pylist()
    assert sorted(keys) == sorted(item_key(i) for i in bigger) and len(set(keys)) == len(keys)
    assert verify_version(store) == []
    assert mini_build(store, bigger, cfg, mode="extend") == []  # nothing left to do
    with pytest.raises(ValueError, match="not among the planned items"):
        mini_build(store, small[:-1], cfg, mode="extend")


def test_overwrite_rebuilds_from_scratch(store: Store) -> None:
    cfg = ShardConfig(format="webdataset", max_count=4)
    mini_build(store, items_for(3), cfg)
    other = items_for(2)
    with pytest.raises(ValueError, match="overwrite"):
        mini_build(store, other, cfg, mode="resume")
    mini_build(store, other, cfg, mode="overwrite")
    assert sorted(read_index(store).column("key").to_pylist()) == sorted(item_key(i) for i in other)
    assert verify_version(store) == []


def test_resume_after_a_mid_shard_failure_keeps_names_and_bytes(tmp_path: Path) -> None:
    cfg = ShardConfig(format="parquet", max_count=3)
    items = items_for(3)
    ref = version_store(str(tmp_path / "ref"), "toy", "v1")
    mini_build(ref, items, cfg)
    store = version_store(str(tmp_path / "s"), "toy", "v1")
    plans = plan_shards(items, 3)
    with VersionLease(store) as lease:
        writer = ShardWriter(store, cfg, lease=lease, class_names=CLASSES)
        writer.write_shard(plans[0].name, (record_for(i) for i in plans[0].items))

        def failing():
            yield record_for(plans[1].items[0])
            raise RuntimeError("generator died")

        with pytest.raises(RuntimeError, match="generator died"):
            writer.write_shard(plans[1].name, failing())
    assert [c.name for c in committed_shards(store)] == [plans[0].name]
    mini_build(store, items, cfg)
    assert index_signature(store) == index_signature(ref) and shard_hashes(store) == shard_hashes(ref)


def test_a_shard_file_that_lands_short_is_not_committed(store: Store, monkeypatch) -> None:
    """The size in storage is checked after the file lands: one that lost bytes on the way is never committed."""
    import re

    real_replace = os.replace

    def lands_short(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        if re.search(SHARD_FILE, os.fspath(dst).replace(os.sep, "/")):
            os.truncate(dst, os.path.getsize(dst) - 512)

    monkeypatch.setattr(os, "replace", lands_short)
    writer = ShardWriter(store, ShardConfig(format="webdataset", max_count=10), retries=1)
    with pytest.raises(ShardIntegrityError, match="bytes after writing"):
        writer.write_shard("shard-000000", (record_for(i) for i in items_for(2)))
    monkeypatch.undo()
    assert committed_shards(store) == [] and partial_shards(store) == []


def test_verify_finds_a_key_committed_in_two_shards(store: Store) -> None:
    cfg = ShardConfig(format="webdataset", max_count=10)
    writer = ShardWriter(store, cfg, class_names=CLASSES)
    items = items_for(2)
    writer.write_shard("shard-000000", (record_for(i) for i in items[:4]))
    writer.write_shard("shard-000001", (record_for(i) for i in items[3:]))  # items[3] a second time
    write_card(store, {"dataset": "toy", "version": "v1", "shards": cfg.model_dump()}, {})
    problems = verify_version(store)
    twice = item_key(items[3])
    assert any(f"key {twice!r} appears in shard shard-000000 and in shard shard-000001" in p for p in problems)


def _edit_commit(store: Store, name: str, **fields: Any) -> CommitRecord:
    """Rewrite a shard's commit record with some fields changed (a record that disagrees with what it names)."""
    rel = ("synthetic", COMMITS_DIR, f"{name}.json")
    record = json.loads(store.read_bytes(*rel))
    record.update(fields)
    store.write_bytes(json.dumps(record).encode(), *rel)
    return CommitRecord.from_json(record)


def test_a_shard_holding_other_than_its_recorded_count_fails(store: Store) -> None:
    mini_build(store, items_for(2), ShardConfig(format="webdataset", max_count=3))
    c = committed_shards(store)[0]
    f = c.files[0]
    bad = _edit_commit(store, c.name, files=[{**f.__dict__, "count": f.count + 1}])  # bytes and sha256 still right
    assert any("its commit record says 4" in p for p in verify_shard(store.child("synthetic"), bad))


def test_index_parts_are_checked_against_their_commit_records(store: Store) -> None:
    mini_build(store, items_for(2), ShardConfig(format="parquet", max_count=3))
    first, second = committed_shards(store)
    parts = store.child("synthetic")
    # the first shard's index part replaced by the second's: a valid table, but not the one committed
    parts.write_bytes(parts.read_bytes(second.index_part), first.index_part)
    with pytest.raises(ShardIntegrityError, match=f"index part .*{first.name}.* does not match its commit record"):
        write_index(store)
    assert any("index part" in p and "checksum mismatch" in p for p in verify_shard(parts, first))
    # the record forged to match it: the keys still give it away
    forged = _edit_commit(store, first.name, index_sha256=second.index_sha256)
    assert any("keys in the shard differ from its index part" in p for p in verify_shard(parts, forged))


# ---------------------------------------------------------------------------------------------------------
# Lease
# ---------------------------------------------------------------------------------------------------------
def test_second_build_of_a_version_fails_with_a_clear_message(store: Store) -> None:
    with VersionLease(store, owner="build-A", heartbeat=False):
        with pytest.raises(LeaseHeldError, match="being written by build 'build-A'.*Wait for that build"):
            VersionLease(store, owner="build-B").acquire(wait_s=0.3, poll_s=0.1)
        joined = VersionLease(store, owner="build-A", heartbeat=False).acquire()  # a second worker of build A
        assert joined.held
    assert not store.exists(LEASE_FILE)
    assert VersionLease(store, owner="build-B", heartbeat=False).acquire().held


def test_waiting_build_gets_the_lease_when_the_first_releases(store: Store) -> None:
    import threading

    first = VersionLease(store, owner="A", heartbeat=False).acquire()
    second = VersionLease(store, owner="B", heartbeat=False)
    refused = threading.Event()  # set once B found A's lease (read it after its exclusive create failed)
    read = second.read
    second.read = lambda: (rec := read(), rec and rec["owner"] == "A" and refused.set())[0]
    got: list[VersionLease] = []
    waiter = threading.Thread(target=lambda: got.append(second.acquire(wait_s=3600, poll_s=0.05)))
    waiter.start()
    refused.wait()
    assert not got  # B waits while A holds the lease
    first.release()
    waiter.join()
    assert got == [second] and second.read()["owner"] == "B"
    second.release()


def test_stale_leases_are_taken_over(store: Store) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.write_json(
        {"owner": "dead", "host": os.uname().nodename, "pid": dead.pid, "expires_at": time.time() + 999}, LEASE_FILE
    )
    assert VersionLease(store, owner="B", heartbeat=False).acquire().read()["owner"] == "B"
    store.write_json({"owner": "old", "host": "elsewhere", "pid": 1, "expires_at": time.time() - 1}, LEASE_FILE)
    assert VersionLease(store, owner="C", heartbeat=False).acquire().read()["owner"] == "C"


def test_a_build_that_lost_its_lease_cannot_commit(store: Store) -> None:
    lease = VersionLease(store, owner="A", heartbeat=False).acquire()
    writer = ShardWriter(store, ShardConfig(max_count=10), lease=lease)
    store.write_json({"owner": "B", "host": "elsewhere", "pid": 1, "expires_at": time.time() + 999}, LEASE_FILE)
    with pytest.raises(LeaseLostError, match="held by 'B'"):
        writer.write_shard("shard-000000", [record_for((0, "a", 0))])
    assert committed_shards(store) == []


def test_a_build_that_loses_its_lease_mid_shard_does_not_commit_it(store: Store) -> None:
    lease = VersionLease(store, owner="A", heartbeat=False).acquire()
    writer = ShardWriter(store, ShardConfig(max_count=10), lease=lease)
    items = items_for(1)

    def records():
        yield record_for(items[0])
        # while this shard is written, A's lease expires and build B takes the version
        store.write_json({"owner": "B", "host": "elsewhere", "pid": 1, "expires_at": time.time() + 999}, LEASE_FILE)
        yield from (record_for(i) for i in items[1:])

    with pytest.raises(LeaseLostError, match="held by 'B'"):
        writer.write_shard("shard-000000", records())
    assert committed_shards(store) == []


def test_heartbeat_keeps_a_short_lease_alive(store: Store) -> None:
    lease = VersionLease(store, owner="A", ttl_s=3.0).acquire()
    first_expiry = lease.read()["expires_at"]
    # observed, not slept: wait until the heartbeat has renewed the lease after its first expiry time passed (or
    # until the record has gone a whole TTL past its expiry unrenewed: then there is no heartbeat)
    while (rec := lease.read())["renewed_at"] <= first_expiry and time.time() < rec["expires_at"] + lease.ttl_s:
        time.sleep(0.05)
    assert rec["owner"] == "A" and rec["renewed_at"] > first_expiry, "the heartbeat did not renew the lease"
    with pytest.raises(LeaseHeldError):
        VersionLease(store, owner="B", heartbeat=False).acquire()
    lease.check()
    lease.release()


# ---------------------------------------------------------------------------------------------------------
# Crashes: SIGKILL the writer at chosen points, check the invariants after every kill, then resume
# ---------------------------------------------------------------------------------------------------------
KILL_PER_CLASS = 6  # 18 images in shards of 2: nine shards, enough for one kill per point with progress between
KILL_MAX_COUNT = 2
SHARD_FILE = r"synthetic/shard-\d+\.(tar|parquet)$"
INDEX_PART = r"synthetic/_index/shard-\d+\.parquet$"
COMMIT = r"synthetic/_commits/shard-\d+\.json$"


@dataclass(frozen=True)
class KillPoint:
    """Where the writer dies: when it is about to make (``before``) or has just made (``after``) the ``nth`` file
    matching ``target`` (a regex on its path in the version) visible in this run; ``target == "record"``: when its
    record source is asked for record ``nth`` (mid-shard: the file being written holds some records).

    Locally the writer process kills itself in ``os.replace``, the one call that makes any of its files visible
    (every file is written under a temporary name, then renamed). On an object store the gateway between writer and
    server kills it when the PUT arrives: ``before`` forwarding it, or ``after`` the server stored the object and
    before the writer hears back. ``shards`` is how many shards the run has committed when it dies (-1: all of
    them, the kill is in the finalize step)."""

    name: str
    target: str
    when: str = "before"
    nth: int = 2
    shards: int = 1


LOCAL_KILLS = [
    KillPoint("mid-shard", "record", nth=KILL_MAX_COUNT + 2),  # the second shard holds one of its records
    KillPoint("shard file complete, not yet in place", SHARD_FILE),
    KillPoint("shard file in place, no index part", SHARD_FILE, "after"),
    KillPoint("mid-index-part: written, not yet in place", INDEX_PART),
    KillPoint("after the data, before the commit", COMMIT),
    KillPoint("just after the commit", COMMIT, "after", shards=2),
    KillPoint("mid-finalize: before the index", r"synthetic/index\.parquet$", nth=1, shards=-1),
    KillPoint("mid-finalize: before _info.json", r"synthetic/_info\.json$", nth=1, shards=-1),
    KillPoint("mid-finalize: before the card", r"dataset\.json$", nth=1, shards=-1),
]
S3_KILLS = [
    KillPoint("mid-shard", "record", nth=KILL_MAX_COUNT + 2),
    KillPoint("mid-upload: the shard's PUT never reaches the server", SHARD_FILE),
    KillPoint("upload stored, the writer never hears back", SHARD_FILE, "after"),
    KillPoint("mid-index-part upload", INDEX_PART),
    KillPoint("after the data, before the commit", COMMIT),
    KillPoint("commit stored, the writer never hears back", COMMIT, "after", shards=2),
    KillPoint("mid-finalize: before the index", r"synthetic/index\.parquet$", nth=1, shards=-1),
    KillPoint("mid-finalize: before the card", r"dataset\.json$", nth=1, shards=-1),
]


def check_after_kill(store: Store, plans: Sequence, point: str = "") -> list[str]:
    """The exactly-once invariants a reader relies on at any moment, whatever was killed when: every committed
    shard is one of the plan, whole (size, count, sha256 of its file and index part) and holds exactly its planned
    keys; no key is committed twice; readers see exactly the committed images. Returns the committed names."""
    planned = {p.name: [item_key(i) for i in p.items] for p in plans}
    shard_store = store.child("synthetic")
    commits = committed_shards(store)
    keys: list[str] = []
    for c in commits:
        assert c.name in planned, f"{point}: committed shard {c.name} was never planned"
        assert verify_shard(shard_store, c) == [], f"{point}: committed shard {c.name} is not whole"
        assert c.count == len(planned[c.name]), f"{point}: {c.name} commits {c.count} images"
        got = [s.key for s in iter_shard(shard_store, c, check=True, checksum=True)]
        assert got == planned[c.name], f"{point}: {c.name} holds other keys than planned"
        keys += got
    assert len(keys) == len(set(keys)), f"{point}: a key is committed twice"
    assert committed_keys(store) == {c.name: planned[c.name] for c in commits}, point
    assert [m["key"] for _, _, m in iter_synthetic(store)] == keys, f"{point}: readers see uncommitted images"
    return [c.name for c in commits]


def same_library_env() -> dict[str, str]:
    """The environment for a child Python that must import the very ``realfake`` this process imported (a script's
    own folder, not the working directory, leads its import path)."""
    import realfake

    top = os.path.dirname(os.path.dirname(os.path.abspath(realfake.__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (top, os.environ.get("PYTHONPATH")) if p)}


def run_writer(root: str, storage_options: dict[str, Any] | None, fmt: str, spool: str,
               kill: KillPoint | None = None, started: Callable[[subprocess.Popen], None] | None = None
               ) -> tuple[int, str]:
    """Run the writer process (this module as a script) to its end or its death; returns its exit status and the
    kill point it reported reaching (its own kills write it to a marker file just before SIGKILL)."""
    marker = os.path.join(spool, "reached")
    if os.path.exists(marker):
        os.remove(marker)
    local_kill = json.dumps(kill.__dict__) if kill is not None else ""
    args = [sys.executable, __file__, root, json.dumps(storage_options or {}), fmt, spool, local_kill, marker]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=same_library_env())
    if started is not None:
        started(proc)
    _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"writer failed on its own: {err.decode()[-3000:]}")
    reached = Path(marker).read_text() if os.path.exists(marker) else ""
    return proc.returncode, reached


def kill_chain(root: str, storage_options: dict[str, Any] | None, fmt: str, kills: Sequence[KillPoint],
               gateway: Any = None) -> Store:
    """Kill the writer at each point in turn (each run resumes what the previous one left), check the invariants
    after every kill, then let a last run finish; returns the version's store. ``gateway`` (S3) kills at the
    requests; without it the writer kills itself."""
    store = version_store(root, "toy", "v1", storage_options)
    plans = plan_shards(items_for(KILL_PER_CLASS), KILL_MAX_COUNT)
    spool = tempfile.mkdtemp(prefix="realfake-kill-spool-")  # a killed writer leaves its spooled shard here
    try:
        for point in kills:
            before = len(committed_shards(store))
            remote = gateway is not None and point.target != "record"
            if gateway is not None:
                gateway.arm(point if remote else None)
            rc, reached = run_writer(root, storage_options, fmt, spool, None if remote else point,
                                     gateway.watch if remote else None)
            if remote:
                gateway.wait_idle()  # requests of the dead writer still in flight have landed or failed
                reached = gateway.reached
            assert rc == -signal.SIGKILL and reached == point.name, (point.name, rc, reached)
            names = check_after_kill(store, plans, point.name)
            want = len(plans) if point.shards < 0 else before + point.shards
            assert len(names) == want, f"{point.name}: {len(names)} shards committed, expected {want}"
        if gateway is not None:
            gateway.arm(None)
        rc, _ = run_writer(root, storage_options, fmt, spool)
        assert rc == 0
    finally:
        shutil.rmtree(spool, ignore_errors=True)
    check_after_kill(store, plans, "finished")
    return store


def assert_same_as_uninterrupted(store: Store, tmp_path: Path, fmt: str) -> None:
    """The version a killed-and-resumed build ends with verifies and equals an uninterrupted build, byte for byte."""
    ref = version_store(str(tmp_path / "reference"), "toy", "v1")
    items = items_for(KILL_PER_CLASS)
    mini_build(ref, items, ShardConfig(format=fmt, max_count=KILL_MAX_COUNT))
    assert verify_version(store) == []
    assert sorted(read_index(store).column("key").to_pylist()) == sorted(item_key(i) for i in items)
    assert shard_hashes(store) == shard_hashes(ref) and index_signature(store) == index_signature(ref)


def writer_main(argv: list[str]) -> None:
    """The killable writer: a miniature build (3 classes x 6 images, shards of 2), one shard at a time, that SIGKILLs
    itself at the kill point given as JSON (see :class:`KillPoint`), after naming it in the marker file."""
    import re

    root, options, fmt, spool, kill, marker = argv[0], json.loads(argv[1]) or None, argv[2], argv[3], argv[4], argv[5]
    tempfile.tempdir = spool  # remote shards are spooled here before upload
    store = version_store(root, "toy", "v1", options)
    point = KillPoint(**json.loads(kill)) if kill else None
    seen = Counter()

    def die() -> None:
        Path(marker).write_text(point.name)
        os.kill(os.getpid(), signal.SIGKILL)

    def on_record() -> None:
        seen["record"] += 1
        if point is not None and point.target == "record" and seen["record"] == point.nth:
            die()

    if point is not None and point.target != "record":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):  # every file of the writer becomes visible through this call
            hit = re.search(point.target, os.fspath(dst).replace(os.sep, "/")) is not None
            seen["hit"] += hit
            if hit and seen["hit"] == point.nth and point.when == "before":
                die()
            real_replace(src, dst, *args, **kwargs)
            if hit and seen["hit"] == point.nth and point.when == "after":
                die()

        os.replace = replace
    mini_build(store, items_for(KILL_PER_CLASS), ShardConfig(format=fmt, max_count=KILL_MAX_COUNT),
               on_record=on_record)


@pytest.mark.slow
def test_kills_at_chosen_points_keep_exactly_once_local(tmp_path: Path) -> None:
    store = kill_chain(str(tmp_path / "out"), None, "webdataset", LOCAL_KILLS)
    assert_same_as_uninterrupted(store, tmp_path, "webdataset")


if __name__ == "__main__":
    writer_main(sys.argv[1:])
