"""Training from streamed shards: what its checkpoint records, and augmentation that is a function of the seed, epoch
and image, so that a resume continues the interrupted run and every rank augments its images differently.

The streams run through two persistent DataLoader workers, as ``classifier.workers`` > 0 trains: the workers'
own generators are seeded alike on every rank and anew on a resume, which is what the augmentation must not
depend on.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from test_shards import CLASSES
from test_streaming import built, units_of

from realfake.classify import CHECKPOINT_STATE, train_classifier
from realfake.config import ClassifierConfig
from realfake.data.loaders import LabelledImages
from realfake.data.streaming import StreamingImages

# A narrow ResNet at 16 px with random crops, flips and colour jitter: augmentation draws move the weights.
STREAMED = dict(
    model="resnet18",
    model_kwargs={"channels": [8, 16, 32, 64]},
    image_size=16,
    epochs=3,
    batch_size=8,
    lr=0.05,
    sched="cosine",
    hflip=0.5,
    scale=(0.5, 1.0),
    color_jitter=0.4,
    input_norm="per_image",
    workers=2,
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this module with one intra-op thread (conftest's ``one_thread``)."""


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((wa.float() - wb.float()).abs().max().item() for wa, wb in
               zip(a.state_dict().values(), b.state_dict().values(), strict=True))


class Preemption(Exception):
    """The job's node went away."""


class _Preempted(StreamingImages):
    """A stream whose job is killed as epoch ``at`` starts (after the checkpoint of the epoch before)."""

    def __init__(self, *args, at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at = at

    def set_epoch(self, epoch: int) -> None:
        if epoch == self.at:
            raise Preemption(f"preempted before epoch {epoch}")
        super().set_epoch(epoch)


def test_a_resumed_stream_run_augments_its_later_epochs_as_the_uninterrupted_run(tmp_path: Path) -> None:
    units = units_of(built(tmp_path / "data", n_per_class=8, max_count=4))  # 24 images in 6 shards
    cfg = ClassifierConfig(**STREAMED)
    reference = train_classifier(StreamingImages(units, seed=0), len(CLASSES), cfg)
    ckpt = tmp_path / "checkpoint"
    with pytest.raises(Preemption, match="preempted before epoch 2"):
        train_classifier(_Preempted(units, seed=0, at=2), len(CLASSES), cfg, checkpoint=str(ckpt))
    assert json.loads((ckpt / CHECKPOINT_STATE).read_text())["epoch"] == 2
    resumed = train_classifier(StreamingImages(units, seed=0), len(CLASSES), cfg, checkpoint=str(ckpt))
    assert resumed.resumed_from_epoch == 2
    # Fresh workers in the resumed job: were the crops drawn from their generators, epoch 2 would replay epoch 0's.
    assert [e["loss"] for e in resumed.train_log] == pytest.approx([e["loss"] for e in reference.train_log], abs=1e-6)
    assert _max_diff(reference, resumed) < 1e-6


def test_every_rank_augments_its_share_differently(tmp_path: Path) -> None:
    """Sixteen copies of one labelled image: rank 0's and rank 1's shares hold the same pixels and labels in the
    same number, so only the augmentation can tell their trainings apart, and it must (each image is seeded by its
    own index, not by the loader worker's generator, which every rank seeds alike)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    same = LabelledImages([(image.copy(), 1) for _ in range(16)])
    cfg = ClassifierConfig(**{**STREAMED, "epochs": 1})
    shares = [StreamingImages([], real=same, seed=0, num_workers=2, rank=r, world_size=2) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 8
    rank0, rank1 = (train_classifier(share, 2, cfg) for share in shares)
    assert _max_diff(rank0, rank1) > 1e-4
    # The same share trained twice agrees: the difference is the ranks', not noise.
    again = train_classifier(StreamingImages([], real=same, seed=0, num_workers=2, rank=1, world_size=2), 2, cfg)
    assert _max_diff(rank1, again) == 0


def test_a_stream_checkpoint_records_the_images_of_all_ranks_and_resumes_under_another_world_size(
    tmp_path: Path,
) -> None:
    units = units_of(built(tmp_path / "data", n_per_class=7, max_count=2))  # 21 images in 11 shards
    cfg = ClassifierConfig(**{**STREAMED, "epochs": 1, "workers": 0})
    ckpt = str(tmp_path / "checkpoint")
    rank1 = StreamingImages(units, seed=0, rank=1, world_size=2, open_shards=2)
    assert len(rank1) == 11 and rank1.total == 21  # this process's share, padded; the epoch's images
    train_classifier(rank1, len(CLASSES), cfg, checkpoint=ckpt)
    assert json.loads((tmp_path / "checkpoint" / CHECKPOINT_STATE).read_text())["train_images"] == 21
    # The same images read by one process continue that checkpoint; a stream of other images does not.
    assert train_classifier(StreamingImages(units, seed=0), len(CLASSES), cfg, checkpoint=ckpt).resumed_from_epoch == 1
    with pytest.raises(ValueError, match="differs in: train_images"):
        train_classifier(StreamingImages(units[1:], seed=0), len(CLASSES), cfg, checkpoint=ckpt)


class _Unnamed(torch.utils.data.IterableDataset):
    """A stream that neither names its images nor says its total: its share is all a process knows."""

    def __init__(self, pairs: LabelledImages) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs)


def test_a_stream_without_names_is_augmented_per_worker_and_position_and_still_resumes(tmp_path: Path) -> None:
    pairs = LabelledImages([(Image.fromarray(np.full((20, 20, 3), 10 * i, np.uint8)), i % 3) for i in range(24)])
    cfg = ClassifierConfig(**STREAMED)
    reference = train_classifier(_Unnamed(pairs), len(CLASSES), cfg)
    ckpt = tmp_path / "checkpoint"

    class Preempted(_Unnamed):
        def set_epoch(self, epoch: int) -> None:
            if epoch == 2:
                raise Preemption("preempted")

    with pytest.raises(Preemption):
        train_classifier(Preempted(pairs), len(CLASSES), cfg, checkpoint=str(ckpt))
    state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
    assert state["epoch"] == 2 and state["train_images"] == 24
    resumed = train_classifier(_Unnamed(pairs), len(CLASSES), cfg, checkpoint=str(ckpt))
    assert _max_diff(reference, resumed) < 1e-6


def _epoch_images_of_rank(rank: int, init: str, out: Any) -> None:
    from realfake.classify import _epoch_images
    from realfake.distributed import Ranks as _Ranks

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        share = LabelledImages([(Image.new("RGB", (4, 4)), 0)] * (5 + rank))
        ranks, cpu = _Ranks(rank, 2), torch.device("cpu")
        out.put((rank, _epoch_images(_Unnamed(share), len(share), ranks, cpu), _epoch_images(share, 9, ranks, cpu)))
    finally:
        torch.distributed.destroy_process_group()


def test_a_stream_without_a_total_is_counted_over_the_processes_of_the_group(tmp_path: Path) -> None:
    """Two gloo processes holding 5 and 6 images of an unnamed stream record 11; a map-style set (every process
    holds it whole) records its own length."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_epoch_images_of_rank, args=(r, f"file://{tmp_path / 'group'}", out))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(out.get(timeout=5) for _ in procs) == [(0, 11, 9), (1, 11, 9)]
