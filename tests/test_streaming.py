"""StreamingImages: every committed image once per epoch across workers and ranks, seeded per-epoch order, real
images mixed in, integrity checks, the fast tar reader, and reads from a real S3 API (moto) with faults."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils.data
from PIL import Image
from support.s3 import S3Env, faulty_s3, moto, s3  # noqa: F401 - pytest fixtures
from test_shards import CLASSES, item_key, items_for, mini_build, record_for

from realfake.config import ShardConfig
from realfake.data.loaders import LabelledImages
from realfake.data.shards import (
    COMMITS_DIR,
    ShardIntegrityError,
    ShardWriter,
    SyntheticRecord,
    committed_shards,
    iter_shard,
    iter_synthetic,
)
from realfake.data.storage import Store, version_store
from realfake.data.streaming import StreamingImages, read_shard_entries


def fingerprint(image: Image.Image) -> str:
    """Identity of a decoded image (module level: DataLoader workers run it)."""
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()[:16]


def expected(store: Store) -> Counter:
    return Counter((fingerprint(img), label) for img, label, _ in iter_synthetic(store))


def delivered(ds: StreamingImages, workers: int, persistent: bool = False, epochs: int = 1) -> list[list[tuple]]:
    """What a DataLoader yields per epoch, unbatched, with ``set_epoch`` called as training does."""
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=workers, persistent_workers=persistent and workers > 0
    )
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        out.append([(img, int(label)) for img, label in loader])
    return out


def built(tmp_path: Path, fmt: str = "webdataset", n_per_class: int = 5, max_count: int = 4, replicas: int = 1):
    store = version_store(str(tmp_path / "out"), "toy", "v1")
    mini_build(store, items_for(n_per_class, replicas=replicas), ShardConfig(format=fmt, image_format="png",
                                                                             max_count=max_count))
    return store


def units_of(store: Store):
    return [e.unit() for e in read_shard_entries(store)]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_every_committed_image_exactly_once_per_epoch_across_two_workers(tmp_path: Path, fmt: str) -> None:
    store = built(tmp_path, fmt)
    units = units_of(store)
    assert len(units) == 4 and sum(u.count for u in units) == 15  # 15 images in shards of 4: 4, 4, 4, 3
    ds = StreamingImages(units, transform=fingerprint, seed=3, shuffle_buffer=4)
    assert len(ds) == 15
    epochs = delivered(ds, workers=2, persistent=True, epochs=2)
    for got in epochs:
        assert Counter(got) == expected(store)
    assert epochs[0] != epochs[1]  # set_epoch reaches persistent workers: a new order per epoch


def test_order_is_reproducible_per_seed_and_epoch(tmp_path: Path) -> None:
    store = built(tmp_path, n_per_class=6, max_count=3)
    units = units_of(store)

    def order(seed: int, epoch: int, workers: int = 2) -> list:
        ds = StreamingImages(units, transform=fingerprint, seed=seed, shuffle_buffer=5)
        ds.set_epoch(epoch)
        return delivered_once(ds, workers)

    def delivered_once(ds: StreamingImages, workers: int) -> list:
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        return [(img, int(label)) for img, label in loader]

    first = order(0, 1)
    assert order(0, 1) == first  # fresh processes, same seed and epoch: same order
    assert order(0, 2) != first and order(1, 1) != first
    assert Counter(order(1, 1)) == Counter(first)
    # In the main process the order also changes per epoch without set_epoch (each iteration is the next epoch).
    ds = StreamingImages(units, transform=fingerprint, seed=0)
    assert list(ds) != list(ds)
    unshuffled = StreamingImages(units, transform=fingerprint, shuffle=False)
    keys = [k for e in read_shard_entries(store) for k in e.keys]
    assert [fp for fp, _ in unshuffled] == [fingerprint(record_for(_item(k)).image) for k in keys]


def _item(key: str) -> tuple[int, str, int]:
    for it in items_for(6):
        if item_key(it) == key:
            return it
    raise KeyError(key)


def test_uncommitted_shards_and_unselected_images_are_skipped(tmp_path: Path) -> None:
    store = built(tmp_path)
    shards = store.child("synthetic")
    commits = committed_shards(store)
    victim = commits[1]
    lost = {k for k in read_shard_entries(store)[1].keys}
    shards.remove(COMMITS_DIR, f"{victim.name}.json")  # the tar and index part stay, uncommitted
    with open(shards.path("shard-999999.tar"), "wb") as f:  # a stray copy of a committed tar, never committed
        f.write(shards.read_bytes(commits[0].files[0].path))
    entries = read_shard_entries(store)
    assert [e.commit.name for e in entries] == [c.name for c in commits if c.name != victim.name]
    got = list(StreamingImages([e.unit() for e in entries], transform=None))
    assert len(got) == 15 - len(lost)
    # A unit keeping some positions yields exactly those images.
    e = entries[0]
    ds = StreamingImages([e.unit([0, 2])], transform=fingerprint)
    want = {fingerprint(record_for(_item_any(e.keys[i])).image) for i in (0, 2)}
    assert {fp for fp, _ in ds} == want and len(ds) == 2


def _item_any(key: str) -> tuple[int, str, int]:
    for it in items_for(10, replicas=3):
        if item_key(it) == key:
            return it
    raise KeyError(key)


def test_real_images_are_mixed_into_the_stream_once_each(tmp_path: Path) -> None:
    store = built(tmp_path, n_per_class=8, max_count=8)  # 24 synthetic images in 3 shards
    rng = np.random.default_rng(1)
    real_images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(12)]
    real = LabelledImages((im, i % 3) for i, im in enumerate(real_images))
    ds = StreamingImages(units_of(store), real=real, real_indices=range(1, 12), transform=fingerprint, seed=5)
    assert len(ds) == 24 + 11
    got = delivered(ds, workers=2)[0]
    want = expected(store) + Counter((fingerprint(im), i % 3) for i, im in enumerate(real_images) if i)
    assert Counter(got) == want
    real_fps = {fingerprint(im) for im in real_images}
    first_half = [fp in real_fps for fp, _ in got[: len(got) // 2]]
    assert 0 < sum(first_half) < len(first_half)  # interleaved, not all real after all synthetic


def test_ddp_ranks_split_shards_and_yield_equal_counts(tmp_path: Path) -> None:
    store = built(tmp_path, n_per_class=7, max_count=2)  # 21 images in 11 shards (ten of 2, one of 1)
    units = units_of(store)
    per_rank = []
    for rank in range(2):
        ds = StreamingImages(units, transform=fingerprint, seed=2, num_workers=2, rank=rank, world_size=2,
                             open_shards=2)  # 11 shards >= 4 workers x 2: whole shards, no striping
        got = delivered(ds, workers=2)[0]
        assert len(got) == len(ds) == 2 * 6  # every worker of every rank yields ceil(21 / 4) images
        per_rank.append(got)
    union = Counter(per_rank[0]) + Counter(per_rank[1])
    assert set(union) == set(expected(store))  # every image read, the 3 padding images are repeats
    assert sum(union.values()) - len(expected(store)) == 3
    plan = ds.plan(epoch=0, num_workers=2, world_size=2)
    assert sorted(u for s in plan for u, stripe in s.units if stripe is None) == list(range(len(units)))  # once
    with pytest.raises(ValueError, match="Write smaller shards"):
        StreamingImages(units[:2], rank=0, world_size=2).plan(epoch=0, num_workers=2, world_size=2)


def test_corrupt_and_truncated_shards_raise(tmp_path: Path) -> None:
    store = built(tmp_path)
    shards = store.child("synthetic")
    commit = committed_shards(store)[0]
    path = shards.path(commit.files[0].path)
    with tarfile.open(path) as tar:
        first = tar.getmembers()[0]
    pad = first.offset_data + first.size  # the zero padding after the first image: every member still parses
    assert pad % 512
    data = bytearray(Path(path).read_bytes())
    data[pad] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match="sha256"):
        list(StreamingImages(units_of(store)[:1]))
    assert len(list(StreamingImages(units_of(store)[:1], check=False))) == 4  # unchecked: bytes are bytes
    Path(path).write_bytes(bytes(data[:1500]))
    with pytest.raises(ShardIntegrityError, match="bytes, its commit record"):
        list(StreamingImages(units_of(store)[:1]))


def test_fast_tar_reader_matches_tarfile_including_long_names(tmp_path: Path) -> None:
    store = version_store(str(tmp_path / "out"), "toy", "v1")
    long_key = "0001_" + "x" * 120 + "_0"  # > 100 characters: the writer uses a PAX header
    recs = [record_for(it) for it in items_for(2)]
    recs.append(SyntheticRecord(long_key, 1, "square", recs[0].image, {"replica": 0}))
    commit = ShardWriter(store, ShardConfig(image_format="png")).write_shard("shard-000000", recs)
    shards = store.child("synthetic")
    fast = [(s.key, s.label, s.image, s.meta) for s in iter_shard(shards, commit, check=True, checksum=True)]
    members: dict[str, dict[str, bytes]] = {}  # the reference: the same shard as tarfile reads it
    with tarfile.open(shards.path(commit.files[0].path)) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    slow = [(k, int(v["cls"]), v["png"], json.loads(v["json"])) for k, v in members.items()]
    assert fast == slow and fast[-1][0] == long_key
    with tarfile.open(shards.path(commit.files[0].path)) as tar:
        assert any(len(m.name) > 100 for m in tar.getmembers())


def test_jpeg_draft_decoding_keeps_at_least_the_requested_size(tmp_path: Path) -> None:
    store = version_store(str(tmp_path / "out"), "toy", "v1")
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (256, 200, 3), dtype=np.uint8))
    ShardWriter(store, ShardConfig(image_format="jpg")).write_shard(
        "shard-000000", [SyntheticRecord("0000_a_0", 0, "circle", big, {"replica": 0})]
    )
    size = lambda im: im.size  # noqa: E731
    assert list(StreamingImages(units_of(store), transform=size)) == [((200, 256), 0)]
    assert list(StreamingImages(units_of(store), transform=size, decode_size=60)) == [((100, 128), 0)]
    assert list(StreamingImages(units_of(store), transform=size, decode_size=20)) == [((25, 32), 0)]


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    units = units_of(built(tmp_path))
    with pytest.raises(ValueError, match="shuffle_buffer"):
        StreamingImages(units, shuffle_buffer=0)
    with pytest.raises(ValueError, match="rank and world_size together"):
        StreamingImages(units, rank=0)
    with pytest.raises(ValueError, match="rank must lie"):
        StreamingImages(units, rank=2, world_size=2)
    with pytest.raises(ValueError, match="real_indices must lie"):
        StreamingImages(units, real=LabelledImages([]), real_indices=[0])
    with pytest.raises(ValueError, match="epoch must be"):
        StreamingImages(units).set_epoch(-1)


@pytest.mark.s3
def test_streams_from_s3_with_two_workers(s3: S3Env) -> None:  # noqa: F811
    store = version_store(s3.root, "toy", "v1", s3.storage_options)
    mini_build(store, items_for(4), ShardConfig(image_format="png", max_count=5))
    units = units_of(store)
    assert len(units) == 3 and units[0].folder_uri.startswith("s3://")
    ds = StreamingImages(units, transform=fingerprint, seed=1)
    got = delivered(ds, workers=2, persistent=True, epochs=2)  # forked workers open their own s3fs clients
    assert Counter(got[0]) == Counter(got[1]) == expected(store)


@pytest.mark.s3
@pytest.mark.parametrize("faulty_s3", [{"failure_rate": 0.15, "after_share": 0.5, "seed": 7}], indirect=True)
def test_streaming_rides_out_transient_s3_faults(faulty_s3: S3Env, s3: S3Env) -> None:  # noqa: F811
    clean = version_store(s3.root, "toy", "v1", s3.storage_options)
    mini_build(clean, items_for(4), ShardConfig(image_format="png", max_count=5))
    want = expected(clean)
    # The same objects, read through the proxy that fails 15% of the requests.
    faulty = Store(clean.uri(), faulty_s3.storage_options)
    units = [e.unit() for e in read_shard_entries(faulty)]
    assert faulty_s3.proxy is not None
    before = faulty_s3.proxy.counts.injected
    for _ in range(3):
        assert Counter(StreamingImages(units, transform=fingerprint, seed=1)) == want
    assert faulty_s3.proxy.counts.injected > before  # faults did hit the shard reads


def test_open_shards_mix_the_classes_of_class_ordered_shards(tmp_path: Path) -> None:
    store = built(tmp_path, n_per_class=8, max_count=4)  # written in class order: 2 shards per class
    units = units_of(store)
    first = lambda ds: [label for _, label in itertools.islice(iter(ds), 8)]  # noqa: E731
    assert len(set(first(StreamingImages(units, open_shards=1, shuffle_buffer=1, seed=0)))) <= 2
    assert len(set(first(StreamingImages(units, open_shards=6, shuffle_buffer=1, seed=0)))) == 3
    with pytest.raises(ValueError, match="open_shards"):
        StreamingImages(units, open_shards=0)


def test_small_versions_are_striped_so_every_worker_sees_every_shard(tmp_path: Path) -> None:
    store = built(tmp_path, n_per_class=4, max_count=4)  # 3 shards, one class each: fewer than 2 per worker
    units = units_of(store)
    ds = StreamingImages(units, transform=fingerprint, seed=4)
    plan = ds.plan(epoch=0, num_workers=2, world_size=1)
    assert [sorted(u for u, _ in s.units) for s in plan] == [[0, 1, 2], [0, 1, 2]]
    assert [s.load for s in plan] == [6, 6]
    got = delivered(ds, workers=2)[0]
    assert Counter(got) == expected(store)
    for worker in (got[0::2], got[1::2]):  # unbatched loaders alternate between the workers
        assert {label for _, label in worker} == {0, 1, 2}


def test_training_from_a_stream_with_two_workers_steps_even_when_a_worker_has_under_one_batch(tmp_path: Path) -> None:
    """Each DataLoader worker batches its own share of the stream: with drop_last it would drop every worker's
    remainder and, when a share is under one batch, train on nothing at all while logging a loss of 0."""
    from realfake.classify import train_classifier
    from realfake.config import ClassifierConfig

    store = built(tmp_path, n_per_class=12)  # 36 images, 2 workers: 18 each, under one batch of 20
    units = units_of(store)
    cfg = ClassifierConfig(model="resnet18", model_kwargs={"channels": [8, 16, 32, 64]}, image_size=16, epochs=2,
                           batch_size=20, lr=0.05, workers=2, mixup=0.2, input_norm="per_image", hflip=0.0)
    model = train_classifier(StreamingImages(units, seed=0), len(CLASSES), cfg)
    assert [e["epoch"] for e in model.train_log] == [1, 2]
    assert all(e["loss"] > 0 for e in model.train_log)  # batches were trained on in every epoch


def test_a_corrupt_pax_record_is_an_integrity_error_not_a_hang() -> None:
    from realfake.data.shards.tar import _pax_path

    assert _pax_path(b"16 path=abc.png\n") == b"abc.png"
    for bad in (b"0 path=x\n", b"-5 path=x\n", b"99 path=x\n", b"x path=y\n", b"path=x\n"):
        with pytest.raises(ShardIntegrityError, match="corrupt PAX header"):
            _pax_path(bad, "s.tar")


@pytest.mark.parametrize("fault", ["sha256", "count"])
def test_a_ddp_trimmed_share_runs_the_same_shard_checks_as_an_untrimmed_one(tmp_path: Path, fault: str) -> None:
    """Rank 0 reads a whole shard of 4 but may deliver only ceil(5 / 2) = 3 images, so it stops inside that shard;
    its checks (sha256 with verify_shards, the index part's count without) run at the shard's end all the same.
    Without a shuffle buffer: one at least as large as the trim would read the shard to its end anyway."""
    store = built(tmp_path)
    entries = read_shard_entries(store)
    first = entries[0]
    if fault == "sha256":  # the archive's last byte (end-of-archive zeros): only the file's sha256 sees it
        path = Path(store.child("synthetic").path(first.commit.files[0].path))
        data = bytearray(path.read_bytes())
        assert data[-1] == 0
        data[-1] = 1
        path.write_bytes(bytes(data))
        suspect, match = first.unit(), "sha256"
    else:  # its index part names an image the shard does not hold (verify_shards off: the count check remains)
        suspect = dataclasses.replace(first.unit(), keep=frozenset(first.keys[:3]) | {"0009_not_in_the_shard_0"})
        match = "3 of the 4 selected images found"
    untrimmed = StreamingImages([suspect], check=fault == "sha256")
    with pytest.raises(ShardIntegrityError, match=match):
        list(untrimmed)
    ranks = [StreamingImages([suspect, entries[1].unit([0])], rank=r, world_size=2, open_shards=1, seed=0,
                             shuffle_buffer=1, check=fault == "sha256") for r in range(2)]  # 4 + 1 over 2 ranks
    shares = ranks[0].plan(epoch=0, num_workers=1, world_size=2)
    assert [(s.units, s.load, s.quota) for s in shares] == [([(0, None)], 4, 3), ([(1, None)], 1, 3)]
    with pytest.raises(ShardIntegrityError, match=match):
        list(ranks[0])
    assert len(list(ranks[1])) == 3  # the other rank pads its one image with repeats and is unaffected


def test_keys_tell_images_apart_whatever_the_ranks_and_workers(tmp_path: Path) -> None:
    """``iter_keyed`` names each image by its index in the one-process order, which augmentation is seeded by."""
    store = built(tmp_path, n_per_class=8, max_count=3)  # 24 images in 8 shards
    units = units_of(store)

    def keyed(ds: StreamingImages, workers: int) -> dict[tuple, str]:
        class Keyed(torch.utils.data.IterableDataset):
            def __iter__(self):
                return ds.iter_keyed()

        ds.set_epoch(1)
        loader = torch.utils.data.DataLoader(Keyed(), batch_size=None, num_workers=workers)
        return {tuple(int(k) for k in key): fp for fp, _, key in loader}

    one = keyed(StreamingImages(units, transform=fingerprint, seed=6), workers=0)
    unshuffled = [fp for fp, _ in StreamingImages(units, transform=fingerprint, shuffle=False)]
    assert one == {(1, i, 0): fp for i, fp in enumerate(unshuffled)}
    two_ranks: dict[tuple, str] = {}
    for rank in range(2):
        got = keyed(StreamingImages(units, transform=fingerprint, seed=6, num_workers=2, rank=rank, world_size=2,
                                    open_shards=1), workers=2)
        assert not set(got) & set(two_ranks)
        two_ranks |= got
    assert two_ranks == one  # 24 images over 4 workers: no padding, each image once under its own key
    # Padding repeats (21 images over 4 workers: 3 repeats) are told apart from the first reading.
    padded: list[tuple] = []
    for rank in range(2):
        ds = StreamingImages(units[:7], transform=fingerprint, num_workers=2, rank=rank, world_size=2, open_shards=1)
        padded += list(keyed(ds, workers=2))
    assert sorted(i for _, i, r in padded if r == 0) == list(range(21))
    assert len([1 for _, _, r in padded if r == 1]) == 3
