"""Streaming training reads: committed shards decoded in the DataLoader workers, shard by shard.

A version's synthetic images are read for training the way they were written: one committed shard (WebDataset
tar or Parquet, local or on an object store) at a time, sequentially, never the whole set in memory.
:class:`StreamingImages` is a ``torch.utils.data.IterableDataset`` over a list of :class:`ShardUnit` (a
committed shard plus which of its images to keep) and, optionally, a map-style dataset of real images mixed in.
Each epoch it shuffles the shard order with ``(seed, epoch)`` and hands whole shards to the global workers
(``rank * num_workers + worker``), so that no shard is read twice; a worker reads ``open_shards`` of its shards
at once, drawing each image from a random one of them, interleaves its real images in proportion to what is
left, and passes it all through an in-memory shuffle buffer of encoded bytes (decoding happens on the way out,
in the worker). Reading several shards at once matters because the synthesis stage writes shards in class
order: one shard at a time would fill whole batches with one or two classes. A version with fewer than
``open_shards`` shards per worker is striped instead: every worker reads every shard and keeps every ``G``-th
image, so that each worker, and each of its batches, sees every shard.
Uncommitted files are never listed, shard checksums and counts are verified as the bytes stream past
(``check``), and a transient storage error re-opens the shard and skips what was already delivered.

One process (any number of workers) yields every selected image exactly once per epoch. Under DDP every
worker of every rank yields the same number of images (``ceil(total / (world_size * num_workers))``), padding
with repeats of its own images or trimming, so that every rank runs the same number of steps; a trimmed worker
still reads the rest of its share, undecoded, so that its shards are checked as an untrimmed worker's are.

The order depends on ``seed``, the epoch, the number of workers and ranks only. Call :meth:`set_epoch` at the
start of every epoch, as with ``DistributedSampler``; the epoch lives in shared memory, so persistent workers
see it. Without it, the order still changes from one epoch to the next wherever the same dataset object is
iterated again (the main process, persistent workers). :meth:`StreamingImages.iter_keyed` names each delivered
image by ``(epoch, index, repeat)``, which depends on none of the workers and ranks: training seeds each image's
augmentation from it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import math
import multiprocessing
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch.distributed
import torch.utils.data
from PIL import Image

from realfake.data.shards import CommitRecord, ShardIntegrityError, ShardSample, committed_shards, iter_shard
from realfake.data.shards.index import index_parts
from realfake.data.storage import IO_ATTEMPTS, IO_BACKOFF_S, Store, is_transient_io, read_parquet
from realfake.distributed import process_rank

__all__ = [
    "ShardEntries",
    "ShardUnit",
    "StreamingImages",
    "read_shard_entries",
]

log = logging.getLogger(__name__)

_STORES: dict[tuple[int, str], Store] = {}


@dataclass(frozen=True)
class ShardEntries:
    """What one committed shard holds, read from its index part: a key, label, class name and replica per image.

    Attributes:
        folder_uri: URI of the shard folder (``{version}/synthetic``).
        storage_options: fsspec options to open it with.
        commit: The shard's commit record.
        keys: Sample keys in shard order.
        labels: Class index of each image.
        class_names: Class name of each image.
        replicas: Replica number of each image (``None`` where the writer recorded none).
    """

    folder_uri: str
    storage_options: dict[str, Any]
    commit: CommitRecord
    keys: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    replicas: tuple[int | None, ...]

    def unit(self, keep: Sequence[int] | None = None) -> ShardUnit:
        """The shard as a streaming unit keeping the images at positions ``keep`` (None: all of them)."""
        if keep is None:
            return ShardUnit(self.folder_uri, self.storage_options, self.commit, None, len(self.keys))
        return ShardUnit(
            self.folder_uri, self.storage_options, self.commit, frozenset(self.keys[i] for i in keep), len(keep)
        )


@dataclass(frozen=True)
class ShardUnit:
    """One committed shard to stream and the keys of the images to keep from it (None keeps all ``count``)."""

    folder_uri: str
    storage_options: dict[str, Any] = field(repr=False)
    commit: CommitRecord
    keep: frozenset[str] | None
    count: int


def read_shard_entries(store: Store, folder: str = "synthetic") -> list[ShardEntries]:
    """The committed shards of a version with the key, label, class name and replica of every image.

    Read from the index parts (one small Parquet file per shard, checked against the commit record's sha256), so
    no image byte is read; shards that are not committed are not listed.

    Raises:
        ShardIntegrityError: An index part does not match its commit record.
    """
    s = store.child(folder)
    commits = committed_shards(store, folder)
    if not commits:
        return []
    paths = [s.path(c.index_part) for c in commits]
    blobs = index_parts(s, commits, paths)
    out = []
    for c, p in zip(commits, paths, strict=True):
        blob = blobs[p]
        if hashlib.sha256(blob).hexdigest() != c.index_sha256:
            raise ShardIntegrityError(f"index part {s.uri(c.index_part)} does not match its commit record")
        t = read_parquet(blob, columns=["key", "label", "class_name", "replica"]).to_pydict()
        if len(t["key"]) != c.count:
            raise ShardIntegrityError(
                f"index part {s.uri(c.index_part)} lists {len(t['key'])} images, its commit record {c.count}"
            )
        out.append(
            ShardEntries(
                folder_uri=s.uri(),
                storage_options=dict(store.storage_options),
                commit=c,
                keys=tuple(t["key"]),
                labels=tuple(int(v) for v in t["label"]),
                class_names=tuple(t["class_name"]),
                replicas=tuple(None if v is None else int(v) for v in t["replica"]),
            )
        )
    return out


@dataclass
class _Share:
    """What one global worker reads in one epoch: shard units (whole, or the stripe ``(g, G)`` of their kept
    images at positions ``g, g + G, ...``) and real indices, in reading order, and how many images it must
    deliver (``quota``; ``load`` is what its share holds)."""

    units: list[tuple[int, tuple[int, int] | None]] = field(default_factory=list)  # (unit, stripe)
    real: list[int] = field(default_factory=list)
    load: int = 0
    quota: int = 0


def _store(uri: str, storage_options: dict[str, Any]) -> Store:
    # One Store per process and folder: fsspec's async filesystems (s3fs) refuse to be used across a fork.
    key = (os.getpid(), uri)
    s = _STORES.get(key)
    if s is None:
        s = _STORES[key] = Store(uri, storage_options)
    return s


class _Synthetic(NamedTuple):
    """A synthetic image on its way through the shuffle buffer, still encoded."""

    index: int  # position in the one-process unshuffled order: keys the image's augmentation
    data: bytes
    label: int
    key: str
    folder_uri: str
    shard: str


class _Real(NamedTuple):
    """A real image on its way through the shuffle buffer: its position in ``real_indices``."""

    index: int
    real: int


_Item = _Synthetic | _Real


def _stripe_count(count: int, stripe: tuple[int, int] | None) -> int:
    return count if stripe is None else len(range(stripe[0], count, stripe[1]))


def _rng_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


class StreamingImages(torch.utils.data.IterableDataset):
    """Committed shards (and optionally real images) streamed as ``(image, label)``, shuffled per epoch.

    Args:
        shards: The shard units to read (see :meth:`ShardEntries.unit`).
        real: A map-style dataset of ``(PIL image, label)`` mixed into the stream (e.g. ``RealImages``).
        real_indices: Which indices of ``real`` to use (default: all).
        seed: Seed of the shard order, the interleaving and the shuffle buffer.
        shuffle: Shuffle per epoch; False reads shards in the given order and yields the real images after them.
        shuffle_buffer: Images held (encoded) in each worker's shuffle buffer; 1 disables it.
        open_shards: Shards each worker reads at once, drawing its next image from a random one of them. Shards
            written in class order (as the synthesis stage writes them) hold a few classes each; reading
            several at once gives every batch more classes than any shuffle buffer of one shard's size could.
        transform: Applied to each RGB PIL image in the worker (None yields the image).
        check: Verify each shard file's size, sha256 and count against its commit record while reading.
        decode_size: Let JPEG decoding scale down in the DCT (PIL ``draft``) while both sides stay at least this
            many pixels; for transforms that shrink the image anyway. None decodes at full size.
        num_workers: DataLoader workers the dataset will be read with; only makes ``len()`` exact under DDP.
        rank: This process's rank (default: :func:`~realfake.distributed.process_rank` when iterated).
        world_size: Number of ranks (default: :func:`~realfake.distributed.process_rank`).

    Attributes:
        total: Images one epoch holds over all ranks and workers (each selected image once, padding excluded);
            ``len()`` is this process's share.
    """

    def __init__(
        self,
        shards: Sequence[ShardUnit],
        *,
        real: torch.utils.data.Dataset | None = None,
        real_indices: Sequence[int] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        open_shards: int = 8,
        transform: Callable[[Image.Image], Any] | None = None,
        check: bool = True,
        decode_size: int | None = None,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
        if open_shards < 1:
            raise ValueError(f"open_shards must be >= 1, got {open_shards}")
        if (rank is None) != (world_size is None):
            raise ValueError("pass rank and world_size together, or neither (then torch.distributed decides)")
        if world_size is not None and not 0 <= rank < world_size:  # type: ignore[operator]
            raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}")
        self.shards = list(shards)
        self.real = real
        if real is None and real_indices:
            raise ValueError("real_indices given without a real dataset")
        n_real = len(real) if real is not None else 0  # type: ignore[arg-type]
        self.real_indices = list(range(n_real)) if real_indices is None else [int(i) for i in real_indices]
        if any(not 0 <= i < n_real for i in self.real_indices):
            raise ValueError(f"real_indices must lie in [0, {n_real})")
        self.seed = int(seed)
        self.shuffle = shuffle
        self.shuffle_buffer = int(shuffle_buffer)
        self.open_shards = int(open_shards)
        self.transform = transform
        self.check = check
        self.decode_size = decode_size
        self.num_workers = max(0, int(num_workers))
        self.rank, self.world_size = rank, world_size
        # An image's index: its position in the one-process unshuffled order (the units' kept images, then the
        # real ones), the same whatever the epoch, ranks or workers; it keys the image's augmentation.
        self._offsets = list(itertools.accumulate((u.count for u in self.shards), initial=0))
        self.total = self._offsets[-1] + len(self.real_indices)
        # The epoch lives in shared memory so that set_epoch() in the main process reaches persistent workers.
        self._epoch = multiprocessing.get_context().RawValue("q", -1)
        self._iterations = 0

    # -- sizes and epochs ------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        if self.world_size is not None:
            return int(self.rank), int(self.world_size)  # type: ignore[arg-type]
        return process_rank()

    def __len__(self) -> int:
        """Images one epoch yields in this process (per rank under DDP)."""
        _, world = self._world()
        if world == 1:
            return self.total
        workers = max(1, self.num_workers)
        return workers * math.ceil(self.total / (world * workers))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (every worker, persistent ones included)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.value = int(epoch)

    def _next_epoch(self) -> int:
        epoch = self._epoch.value if self._epoch.value >= 0 else self._iterations
        self._iterations += 1
        return int(epoch)

    # -- the plan of one epoch -------------------------------------------------------------------------------
    def plan(self, epoch: int, num_workers: int, world_size: int) -> list[_Share]:
        """What each global worker (``rank * num_workers + worker``) reads in ``epoch``; the same in every process.

        With at least ``open_shards`` shards per global worker, shards go whole to the least-loaded worker,
        largest first, ties in the epoch's shuffled order, so no byte is read twice. With fewer (a small version,
        or many workers) every worker reads every shard and keeps its stripe of the images: whole shards would
        leave each worker, and so each of its batches, with the few classes of its few shards; the price, every
        worker reading every byte, is bounded by the version being small. Real indices are dealt round-robin
        after a shuffle. Under DDP every worker's quota is the same.
        """
        g_count = max(1, num_workers) * world_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.shards)) if self.shuffle else np.arange(len(self.shards))
        real_order = rng.permutation(len(self.real_indices)) if self.shuffle else np.arange(len(self.real_indices))
        shares = [_Share() for _ in range(g_count)]
        for pos, i in enumerate(real_order):
            shares[pos % g_count].real.append(int(i))
        for s in shares:
            s.load = len(s.real)
        if g_count > 1 and len(self.shards) < g_count * (self.open_shards if self.shuffle else 2):
            for g, s in enumerate(shares):
                for u in (int(u) for u in order):
                    n = _stripe_count(self.shards[u].count, (g, g_count))
                    if n:
                        s.units.append((u, (g, g_count)))
                        s.load += n
        else:
            rank_of = {int(u): r for r, u in enumerate(order)}
            for u in sorted((int(u) for u in order), key=lambda u: -self.shards[u].count):  # stable: ties in order
                target = min(range(g_count), key=lambda g: shares[g].load)
                shares[target].units.append((u, None))
                shares[target].load += self.shards[u].count
            for s in shares:
                s.units.sort(key=lambda us: rank_of[us[0]])
        for s in shares:
            s.quota = s.load
        if world_size > 1:
            quota = math.ceil(self.total / g_count)
            empty = [g for g, s in enumerate(shares) if s.load == 0]
            if empty and quota > 0:
                raise ValueError(
                    f"{len(self.shards)} shard(s) and {len(self.real_indices)} real image(s) cannot feed "
                    f"{world_size} ranks x {max(1, num_workers)} workers: worker {empty[0]} would get no image. "
                    "Write smaller shards (shards.max_count) or use fewer workers or ranks"
                )
            for s in shares:
                s.quota = quota
        return shares

    # -- reading ---------------------------------------------------------------------------------------------
    def _read_unit(self, unit: ShardUnit, stripe: tuple[int, int] | None = None) -> Iterator[tuple[int, ShardSample]]:
        """The kept samples of one shard (or their ``stripe``), each with its position among the unit's kept
        images; a transient storage error re-opens the shard and skips what was yielded."""
        store = _store(unit.folder_uri, unit.storage_options)
        want = _stripe_count(unit.count, stripe)
        done = 0
        for attempt in range(IO_ATTEMPTS):
            kept = seen = 0
            try:
                for sample in iter_shard(store, unit.commit, check=self.check, checksum=self.check, meta=False):
                    if unit.keep is not None and sample.key not in unit.keep:
                        continue
                    kept += 1
                    if stripe is not None and (kept - 1) % stripe[1] != stripe[0]:
                        continue
                    seen += 1
                    if seen > done:
                        done += 1
                        yield kept - 1, sample
                break
            except Exception as e:
                if not is_transient_io(e) or isinstance(e, ShardIntegrityError) or attempt == IO_ATTEMPTS - 1:
                    raise
                log.warning("reading shard %s failed (%s), retry %d", store.uri(unit.commit.name), e, attempt + 1)
                time.sleep(IO_BACKOFF_S * 2**attempt)
        if done != want:
            raise ShardIntegrityError(
                f"shard {store.uri(unit.commit.name)}: {done} of the {want} selected images found; its index "
                "part and its files disagree (run `realfake verify` on the version)"
            )

    def _items(self, share: _Share, rng: random.Random) -> Iterator[_Item]:
        """The share's raw items (encoded synthetic samples, real indices), interleaved and shuffled."""

        def synthetic() -> Iterator[_Synthetic]:
            pending = list(reversed(share.units))
            width = self.open_shards if self.shuffle else 1
            active: list[list[Any]] = []  # [sample iterator, images left, unit, unit number]
            while pending or active:
                while pending and len(active) < width:
                    u, stripe = pending.pop()
                    unit = self.shards[u]
                    entry = [self._read_unit(unit, stripe), _stripe_count(unit.count, stripe), unit, u]
                    if entry[1]:
                        active.append(entry)
                    else:
                        for _ in entry[0]:  # nothing selected: reading it through only runs its checks
                            pass
                if not active:
                    return
                pick = rng.random() * sum(a[1] for a in active)
                i = 0
                while pick >= active[i][1] and i < len(active) - 1:
                    pick -= active[i][1]
                    i += 1
                it, _, unit, u = entry = active[i]
                pos, s = next(it)
                entry[1] -= 1
                yield _Synthetic(self._offsets[u] + pos, s.image, s.label, s.key, unit.folder_uri, unit.commit.name)
                if entry[1] == 0:
                    del active[i]
                    for _, extra in it:  # runs the shard's checks after its last image
                        raise ShardIntegrityError(f"shard {unit.folder_uri}/{unit.commit.name} holds more images "
                                                  f"than its index part (image {extra.key})")

        n_syn = sum(_stripe_count(self.shards[u].count, stripe) for u, stripe in share.units)
        n_real = len(share.real)
        syn, real = synthetic(), iter(share.real)
        merged: Iterator[_Item]
        if not self.shuffle:
            merged = itertools.chain(syn, (self._real_item(i) for i in real))
        else:

            def interleave() -> Iterator[_Item]:
                ns, nr = n_syn, n_real
                while ns or nr:
                    if nr and (not ns or rng.random() * (ns + nr) < nr):
                        nr -= 1
                        yield self._real_item(next(real))
                    else:
                        ns -= 1
                        yield next(syn)
                for _ in syn:  # the synthetic stream has no more: this runs its end (and its last checks)
                    raise AssertionError("synthetic stream longer than its count")

            merged = interleave()
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from merged
            return
        buf: list[_Item] = []
        for item in merged:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = rng.randrange(len(buf))
            yield buf[j]
            buf[j] = item
        rng.shuffle(buf)
        yield from buf

    def _real_item(self, i: int) -> _Real:
        return _Real(self._offsets[-1] + i, self.real_indices[i])

    def _decode(self, item: _Item) -> tuple[Any, int]:
        if isinstance(item, _Real):
            assert self.real is not None
            image, label = self.real[item.real]
        else:
            label = item.label
            try:
                image = Image.open(io.BytesIO(item.data))
                if self.decode_size and image.format == "JPEG":
                    image.draft("RGB", (self.decode_size, self.decode_size))
                image = image.convert("RGB") if image.mode != "RGB" else image
                image.load()
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise ValueError(
                    f"image {item.key} in shard {item.folder_uri}/{item.shard} cannot be decoded: {e}; check the "
                    "shard with `realfake verify` on its version"
                ) from e
        if self.transform is not None:
            image = self.transform(image)
        return image, int(label)

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        for image, label, _ in self.iter_keyed():
            yield image, label

    def iter_keyed(self) -> Iterator[tuple[Any, int, tuple[int, int, int]]]:
        """The epoch's ``(image, label)`` pairs (as :meth:`__iter__`), each with the key ``(epoch, index,
        repeat)`` that tells it apart: ``index`` is the image's position in the one-process unshuffled order
        (the units' kept images in order, then the real indices) and ``repeat`` counts the DDP padding passes
        that deliver it again. The key does not depend on the ranks or workers that read the image, so an
        augmentation seeded by it (:func:`realfake.classify.train_classifier` does) is a function of the seed,
        epoch and image: different on every rank, and the same after a resume as in an uninterrupted run.

        A worker whose share exceeds its DDP quota stops delivering at the quota but still reads the rest of
        its share (without decoding it), so that every shard's size, count and checksum checks run, as they do
        when nothing is trimmed. A padding pass re-reads shards this epoch already checked and stops at once.
        """
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self._world()
        epoch = self._next_epoch()
        g = rank * workers + worker
        share = self.plan(epoch, workers, world)[g]
        if share.quota == 0 or share.load == 0:
            return
        delivered = 0
        for repeat in itertools.count():
            rng = random.Random(_rng_seed(self.seed, epoch, g, repeat))
            items = self._items(share, rng)
            left = share.quota - delivered
            trimmed = share.load > left  # a DDP trim, or the last padding pass: stop at the quota
            for item in itertools.islice(items, left) if trimmed else items:
                image, label = self._decode(item)
                yield image, label, (epoch, item.index, repeat)
                delivered += 1
            if trimmed and repeat == 0:
                for _ in items:  # the trimmed rest: read, not decoded, so each shard's checks run after its end
                    pass
            if delivered >= share.quota:
                return
            if repeat == 0:
                log.debug("worker %d pads %d image(s) with repeats to match the ranks", g, share.quota - delivered)
