"""PyTorch datasets over realfake's images, and the choice of what a train-eval run trains on.

The classifier stage trains and evaluates on ``torch.utils.data.Dataset`` objects that yield
``(image, label)``. :class:`RealImages` reads one split of ``real/manifest.parquet`` and opens every image
through the fsspec URI recorded in its row, so the same code reads a laptop folder or an S3 bucket (with the
store's storage options). :class:`LabelledImages` wraps pairs that are already in memory, such as decoded
synthetic shards or a test fixture. Both return RGB PIL images, or whatever ``transform`` makes of them.

:func:`training_data` turns a data mode (``real``, ``synthetic``, ``real+synthetic``) and the ``train_data``
section of the config into one training set: the real train split from the manifest, the synthetic images of
one or several versions (all of them, or ``x K`` per real image taken as replicas ``0..K-1``), mixed at a
chosen synthetic:real ratio by subsampling the larger side per class, and streamed from the committed shards
(:class:`~realfake.data.streaming.StreamingImages`) or decoded into memory.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import torch.utils.data
from PIL import Image

from realfake.data.images import decode_image
from realfake.data.manifest import RealSample, read_manifest
from realfake.data.storage import StorageError, Store, version_store

if TYPE_CHECKING:
    from realfake.config import BuildConfig, ClassifierConfig
    from realfake.data.streaming import ShardEntries, ShardUnit

__all__ = ["DATA_MODES", "LabelledImages", "RealImages", "TrainingData", "training_data", "train_decode_size"]

log = logging.getLogger(__name__)

DATA_MODES = ("real", "synthetic", "real+synthetic")


class RealImages(torch.utils.data.Dataset):
    """The real images of one split of a dataset version, in manifest (sample_id) order.

    Args:
        store: Store of the dataset version; its storage options are used to open image URIs.
        split: Split name in the manifest (``train`` or ``test``).
        transform: Applied to each RGB PIL image; ``None`` returns the image itself.
    """

    def __init__(self, store: Store, split: str, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.store = store
        self.split = split
        self.transform = transform
        self.samples: list[RealSample] = read_manifest(store, split)
        if not self.samples:
            splits = sorted({s.split for s in read_manifest(store)})
            raise ValueError(
                f"{store.uri('real', 'manifest.parquet')} has no rows with split {split!r}; "
                f"splits present: {', '.join(splits) or 'none'}"
            )
        self.labels: list[int] = [s.label for s in self.samples]
        names: dict[int, str] = {}
        for s in self.samples:
            names.setdefault(s.label, s.class_name)
        self.class_names = names

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, uri: str) -> bytes:
        try:
            with fsspec.open(uri, "rb", **self.store.storage_options) as f:
                return f.read()
        except FileNotFoundError as e:
            raise FileNotFoundError(
                f"image {uri} listed in {self.store.uri('real', 'manifest.parquet')} does not exist; "
                "re-run the prepare stage or restore the file"
            ) from e
        except OSError as e:
            raise StorageError(f"cannot read image {uri}: {e}") from e

    def __getitem__(self, index: int) -> tuple[Any, int]:
        sample = self.samples[index]
        data = self._read(sample.uri)
        try:
            image = decode_image(data)  # the ingest's normalisation: EXIF rotation, 16-bit, alpha on white
        except ValueError as e:
            raise ValueError(f"image {sample.uri} (sample {sample.sample_id}) cannot be decoded: {e}") from e
        return (self.transform(image) if self.transform else image), sample.label


class LabelledImages(torch.utils.data.Dataset):
    """Images with integer labels from any iterable of ``(PIL.Image, label)`` pairs, held in memory.

    Args:
        pairs: The images and their class indices; consumed once.
        transform: Applied to each RGB PIL image; ``None`` returns the image itself.
    """

    def __init__(
        self, pairs: Iterable[tuple[Image.Image, int]], transform: Callable[[Image.Image], Any] | None = None
    ) -> None:
        self.images: list[Image.Image] = []
        self.labels: list[int] = []
        for i, pair in enumerate(pairs):
            try:
                image, label = pair
            except (TypeError, ValueError):
                raise TypeError(f"item {i} must be an (image, label) pair, got {type(pair).__name__}") from None
            if not isinstance(image, Image.Image):
                raise TypeError(f"item {i}: image must be a PIL.Image.Image, got {type(image).__name__}")
            if isinstance(label, bool) or not isinstance(label, int) and not hasattr(label, "__index__"):
                raise TypeError(f"item {i}: label must be an integer class index, got {label!r}")
            label = int(label)
            if label < 0:
                raise ValueError(f"item {i}: label must be >= 0, got {label}")
            self.images.append(image)
            self.labels.append(label)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        if image.mode != "RGB":
            image = image.convert("RGB")
        return (self.transform(image) if self.transform else image), self.labels[index]


# ------------------------------------------------------------------------------------------------------------
# What a train-eval run trains on
# ------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingData:
    """One training set and where its images come from.

    Attributes:
        dataset: Yields ``(PIL image, label)``: map-style for real data alone or in memory, else a
            :class:`~realfake.data.streaming.StreamingImages`.
        mode: ``real``, ``synthetic`` or ``real+synthetic``.
        real_images: Real training images used.
        synthetic_images: Synthetic images used.
        synthetic_versions: URIs of the versions the synthetic images come from.
        replicas: Per version URI, the replica numbers used.
        scale: ``train_data.synthetic_scale`` (None: every committed image).
        mix_ratio: The synthetic:real ratio applied (None: none applied).
        streaming: Whether the synthetic images are streamed from the shards.
    """

    dataset: torch.utils.data.Dataset
    mode: str
    real_images: int = 0
    synthetic_images: int = 0
    synthetic_versions: list[str] = field(default_factory=list)
    replicas: dict[str, list[int]] = field(default_factory=dict)
    scale: int | None = None
    mix_ratio: float | None = None
    streaming: bool = False

    @property
    def tag(self) -> str:
        """Run-name suffix telling this selection apart from the default one (``-3v`` for three pooled
        versions, ``-x3``, ``-r0.5``, or empty)."""
        parts = []
        if len(self.synthetic_versions) > 1:
            parts.append(f"-{len(self.synthetic_versions)}v")
        if self.scale is not None and self.mode != "real":
            parts.append(f"-x{self.scale}")
        if self.mode == "real+synthetic" and self.mix_ratio is not None and self.mix_ratio != 1:
            parts.append(f"-r{self.mix_ratio:g}")
        return "".join(parts)

    def summary(self) -> dict[str, Any]:
        """JSON-able description for ``metrics.json``."""
        return {
            "real_images": self.real_images,
            "synthetic_images": self.synthetic_images,
            "synthetic_versions": list(self.synthetic_versions),
            "synthetic_replicas": {k: list(v) for k, v in self.replicas.items()},
            "synthetic_scale": self.scale,
            "mix_ratio": self.mix_ratio,
            "streaming": self.streaming,
        }


def train_decode_size(cfg: ClassifierConfig) -> int:
    """The smallest decoded side that still gives the training crop its full resolution.

    RandomResizedCrop takes an area share ``s >= scale[0]`` with aspect ratio ``r`` in ``ratio``, so the crop's
    shorter side is at least ``sqrt(scale[0] * min(ratio[0], 1 / ratio[1]))`` of the image's shorter side, and
    it is resized to ``image_size``. A JPEG decoded (DCT-scaled) down to this size loses nothing the crop uses.
    """
    shortest = math.sqrt(cfg.scale[0] * min(cfg.ratio[0], 1.0 / cfg.ratio[1]))
    return math.ceil(cfg.image_size / shortest)


def _stratified(labels: Sequence[int], n_keep: int, seed: int) -> list[int]:
    """Positions of ``n_keep`` of the items, each class keeping its share (largest remainders), drawn by ``seed``."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    exact = {c: n_keep * len(ix) / len(labels) for c, ix in by_class.items()}
    quota = {c: int(q) for c, q in exact.items()}
    for c in sorted(exact, key=lambda c: (quota[c] - exact[c], c))[: n_keep - sum(quota.values())]:
        quota[c] += 1
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c in sorted(by_class):
        keep += rng.choice(by_class[c], quota[c], replace=False).tolist()
    return sorted(keep)


def _synthetic_entries(
    cfg: BuildConfig, store: Store, storage_options: dict | None, class_names: dict[int, str]
) -> tuple[list[str], list[list[ShardEntries]]]:
    """The committed shards of every version in ``train_data.synthetic_versions`` (default: this one), checked
    to hold this dataset's classes."""
    from realfake.data.streaming import read_shard_entries

    versions = list(dict.fromkeys(cfg.train_data.synthetic_versions)) or [cfg.version]
    manifest = store.uri("real", "manifest.parquet")
    uris, per_version = [], []
    for version in versions:
        vstore = store if version == cfg.version else version_store(cfg.root, cfg.dataset, version, storage_options)
        entries = read_shard_entries(vstore)
        if not entries:
            where = "train_data.synthetic_versions" if cfg.train_data.synthetic_versions else "the version"
            raise ValueError(
                f"{vstore.uri('synthetic')} holds no committed shards ({where} names {cfg.dataset}/{version}): "
                f"run the synthesize stage for version {version!r} first, or drop it from "
                "train_data.synthetic_versions"
            )
        for e in entries:
            for key, label, name in zip(e.keys, e.labels, e.class_names, strict=True):
                if class_names.get(label) != name:
                    known = f"names it {class_names[label]!r}" if label in class_names else "has no such class"
                    raise ValueError(
                        f"synthetic image {key} of {vstore.uri()} is class {label} {name!r}, but {manifest} {known}: "
                        "train_data.synthetic_versions must list versions of this dataset with the same classes"
                    )
        uris.append(vstore.uri())
        per_version.append(entries)
    return uris, per_version


def _select_replicas(
    cfg: BuildConfig, uris: list[str], per_version: list[list[ShardEntries]]
) -> tuple[list[list[list[int]]], dict[str, list[int]]]:
    """Positions kept in each shard of each version for ``train_data.synthetic_scale``, and the replicas used.

    Copies are taken replica 0 of every version in order, then replica 1 of every version, and so on, until
    ``synthetic_scale`` copies are in hand.
    """
    scale = cfg.train_data.synthetic_scale
    held = [sorted({r for e in entries for r in e.replicas if r is not None}) for entries in per_version]
    if scale is None:
        every = [[list(range(len(e.keys))) for e in entries] for entries in per_version]
        return every, dict(zip(uris, held, strict=True))
    for uri, entries in zip(uris, per_version, strict=True):
        if any(r is None for e in entries for r in e.replicas):
            raise ValueError(
                f"train_data.synthetic_scale = {scale} selects replicas, but {uri} has images without a replica "
                "number in its index; leave train_data.synthetic_scale unset to use all of its images"
            )
    copies = [(v, r) for r in sorted({r for h in held for r in h}) for v, h in enumerate(held) if r in h]
    if len(copies) < scale:
        have = ", ".join(f"{uri} (replicas {_ranges(h)})" for uri, h in zip(uris, held, strict=True))
        raise ValueError(
            f"train_data.synthetic_scale = {scale} needs {scale} synthetic images per real image, but the "
            f"versions hold {len(copies)}: {have}. Lower train_data.synthetic_scale to at most {len(copies)}, list "
            "more versions in train_data.synthetic_versions, or build a version with "
            f"synthesis.images_per_real >= {scale}"
        )
    chosen: dict[int, set[int]] = defaultdict(set)
    for v, r in copies[:scale]:
        chosen[v].add(r)
    keep = [
        [[i for i, r in enumerate(e.replicas) if r in chosen[v]] for e in entries]
        for v, entries in enumerate(per_version)
    ]
    return keep, {uri: sorted(chosen[v]) for v, uri in enumerate(uris) if chosen[v]}


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    if values == list(range(values[0], values[-1] + 1)) and len(values) > 1:
        return f"{values[0]}-{values[-1]}"
    return ", ".join(map(str, values))


def training_data(cfg: BuildConfig, data: str, storage_options: dict | None = None) -> TrainingData:
    """The training set of a train-eval run: ``data`` picks the mode, ``cfg.train_data`` the rest.

    - ``real``: the real train split of the manifest.
    - ``synthetic``: the committed synthetic images of ``train_data.synthetic_versions`` (default: this
      version), all of them, or ``synthetic_scale`` = K per real image (replicas ``0..K-1``, versions first).
    - ``real+synthetic``: both, the larger side subsampled per class (seed ``classifier.seed``) so that there are
      ``mix_ratio`` synthetic images per real image (``None`` keeps both whole).

    Raises:
        ValueError: Naming the field and what the versions hold, when a mode cannot be served.
    """
    from realfake.data.streaming import StreamingImages

    if data not in DATA_MODES:
        raise ValueError(f"data must be one of {', '.join(DATA_MODES)}, got {data!r}")
    td = cfg.train_data
    store = version_store(cfg.root, cfg.dataset, cfg.version, storage_options)
    real = RealImages(store, "train") if data != "synthetic" else None
    if real is not None and data == "real":
        return TrainingData(real, data, real_images=len(real))
    class_names = {s.label: s.class_name for s in read_manifest(store)}
    uris, per_version = _synthetic_entries(cfg, store, storage_options, class_names)
    keep, replicas = _select_replicas(cfg, uris, per_version)
    entries = [e for es in per_version for e in es]
    positions = [k for ks in keep for k in ks]
    real_idx = list(range(len(real))) if real is not None else []
    ratio = td.mix_ratio if real is not None else None
    if ratio is not None:
        assert real is not None
        labels = [e.labels[i] for e, ks in zip(entries, positions, strict=True) for i in ks]
        n_syn, n_real = len(labels), len(real_idx)
        if n_syn > ratio * n_real:
            want = round(ratio * n_real)
            flat = _stratified(labels, want, cfg.classifier.seed)
            owner = [(u, i) for u, ks in enumerate(positions) for i in ks]
            positions = [[] for _ in entries]
            for j in flat:
                u, i = owner[j]
                positions[u].append(i)
        else:
            want = round(n_syn / ratio)
            real_idx = _stratified(real.labels, want, cfg.classifier.seed)
        if not want:
            raise ValueError(
                f"train_data.mix_ratio = {ratio} leaves no image on one side ({n_syn} synthetic, {n_real} real); "
                "choose a ratio nearer to theirs"
            )
        log.info("mixing %d synthetic with %d real images (train_data.mix_ratio = %s)",
                 sum(map(len, positions)), len(real_idx), ratio)
    units: list[ShardUnit] = [
        e.unit(None if len(ks) == len(e.keys) else ks) for e, ks in zip(entries, positions, strict=True) if ks
    ]
    n_syn = sum(u.count for u in units)
    decode = train_decode_size(cfg.classifier) if td.draft_decode else None
    if td.streaming:
        dataset: torch.utils.data.Dataset = StreamingImages(
            units,
            real=real if real_idx else None,
            real_indices=real_idx if real_idx else None,
            seed=cfg.classifier.seed,
            shuffle_buffer=td.shuffle_buffer,
            open_shards=td.open_shards,
            check=td.verify_shards,
            decode_size=decode,
            num_workers=cfg.classifier.workers,
        )
    else:
        # every process holds the whole set (rank 0 of 1): the sampler of train_classifier splits it across ranks
        ordered = StreamingImages(units, shuffle=False, check=td.verify_shards, decode_size=decode, rank=0,
                                  world_size=1)
        dataset = LabelledImages(iter(ordered))
        if real is not None:
            dataset = torch.utils.data.ConcatDataset([torch.utils.data.Subset(real, real_idx), dataset])
    return TrainingData(
        dataset,
        data,
        real_images=len(real_idx),
        synthetic_images=n_syn,
        synthetic_versions=uris,
        replicas=replicas,
        scale=td.synthetic_scale,
        mix_ratio=ratio,
        streaming=td.streaming,
    )
