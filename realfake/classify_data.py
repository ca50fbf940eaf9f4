"""Feeding classifier training: the seeded augmentation and sampling that make runs exact.

:func:`realfake.classify.train_classifier` draws each image's augmentation from generators seeded by the recipe's
seed, the epoch and the image (:func:`seeded_rngs`), never from the process or loader worker that happens to load
it, and takes each process's share of an epoch from one seeded permutation (:class:`EpochKeys`). That is what
makes ``w`` processes follow the trajectory of one, and a resumed run continue the interrupted one.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.utils.data
from PIL import Image

__all__ = ["EpochKeys", "Transformed", "TransformedStream", "seed_worker", "seeded_rngs"]


class Transformed(torch.utils.data.Dataset):
    """Applies a transform to datasets that yield PIL images; tensors pass through unchanged.

    Indexed by ``(epoch, index)`` keys (the training sampler's), the transform runs under random number
    generators seeded from ``(seed, epoch, index)``: an image's augmentation is then a function of the recipe,
    not of which process, worker or restart happens to load it. Plain integer indices (evaluation) apply the
    transform as it is.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, transform: Callable | None, seed: int | None = None) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        image, label = self.dataset[index]
        if isinstance(image, Image.Image):
            if self.transform is None:
                raise TypeError(
                    "the dataset yields PIL images but no transform is known: pass transform="
                    "build_transforms(cfg, train=False) or a model returned by train_classifier"
                )
            if epoch is None or self.seed is None:
                image = self.transform(image)
            else:
                with seeded_rngs(self.seed, epoch, index):
                    image = self.transform(image)
        return image, int(label)


class TransformedStream(torch.utils.data.IterableDataset):
    """The iterable counterpart of :class:`Transformed`, for datasets that stream their own order.

    Such a dataset (:class:`~realfake.data.streaming.StreamingImages`) shuffles per epoch and splits itself over
    ranks and loader workers; its ``len()`` is what one epoch yields in this process. The transform runs under
    generators seeded per image, never the loader worker's own (which every rank seeds alike, and a resume
    re-seeds as in epoch 0): from ``(seed, epoch, index, repeat)`` where the dataset names each image
    (``iter_keyed``, as ``StreamingImages`` does), so an image's augmentation is the same whichever rank or worker
    reads it; otherwise from ``(seed, epoch, rank, worker, position)``, its place in this worker's stream.
    Either way every rank augments differently and a resumed epoch draws what the uninterrupted run drew.
    """

    def __init__(
        self, dataset: torch.utils.data.IterableDataset, transform: Callable, seed: int, rank: int = 0
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.rank = int(rank)
        # Shared memory, so that set_epoch() in the main process reaches persistent loader workers.
        self._epoch = multiprocessing.get_context().RawValue("q", 0)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def _apply(self, image: Any, key: Iterable[int], restore: bool) -> Any:
        if not isinstance(image, Image.Image):
            return image
        with seeded_rngs(self.seed, *key, restore=restore):
            return self.transform(image)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        keyed = getattr(self.dataset, "iter_keyed", None)
        if callable(keyed):
            # In a loader worker nothing else draws from the global generators: no need to restore them.
            for image, label, key in keyed():
                yield self._apply(image, key, restore=info is None), int(label)
            return
        where = (int(self._epoch.value), self.rank, info.id if info is not None else 0)
        for position, (image, label) in enumerate(self.dataset):  # it may draw from them itself: restore
            yield self._apply(image, (*where, position), restore=True), int(label)


@contextmanager
def seeded_rngs(*key: int, restore: bool = True) -> Iterator[None]:
    """Seed the CPU torch, numpy and python generators from ``key`` for the block, then restore their streams.

    timm's and torchvision's transforms draw from all three; restoring keeps the training loop's own streams
    (dropout, mixup) independent of how many images were loaded in this process. ``restore=False`` leaves them
    seeded, for a loader worker where nothing else draws from them (saving and restoring is most of the cost).
    """
    saved = (torch.get_rng_state(), np.random.get_state(), random.getstate()) if restore else None
    a, b, c = (int(v) for v in np.random.SeedSequence(list(key)).generate_state(3))
    torch.default_generator.manual_seed(a)  # CPU only: CUDA generators belong to the training loop
    np.random.seed(b)
    random.seed(c)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class EpochKeys(torch.utils.data.Sampler):
    """This process's share of each epoch's seeded permutation, as ``(epoch, index)`` keys.

    The permutation is torch's :class:`~torch.utils.data.DistributedSampler` (``seed + epoch``; padded so every
    process gets as many images): process ``r`` of ``w`` takes positions ``r, r + w, ...``, so consecutive
    per-process batches of ``B / w`` together hold exactly the images of the one-process batch of ``B``.
    """

    def __init__(self, n: int, seed: int, rank: int, world: int, take: int | None = None) -> None:
        self.order = torch.utils.data.DistributedSampler(
            range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed
        )
        self.take = len(self.order) if take is None else min(take, len(self.order))  # whole global batches only
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.order.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in itertools.islice(self.order, self.take))

    def __len__(self) -> int:
        return self.take


def seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
