"""The downstream classifier that measures a dataset: build, train, evaluate, predict and extract features.

A dataset is judged by the accuracy on the real test split of a classifier trained on it (the paper's
measure, Tab. 8 recipes). Everything recipe-shaped comes from timm's factories driven by
:class:`~realfake.config.ClassifierConfig` (model, optimizer, scheduler, transforms, mixup, losses), so a
recipe is data and this module is only the explicit training loop around them. The trained network is
returned inside a :class:`Classifier` that carries its own evaluation transform, so evaluation, label
fidelity and feature extraction preprocess images exactly as training did.

Synthetic-to-real transfer is fragile: a network trained on synthetic images can drop to chance on real
ones when their global brightness or contrast differs, because batch-norm running statistics and the
first filters are fitted to the synthetic intensity distribution. ``input_norm="per_image"`` standardises
every image on its own (zero mean, unit variance over its pixels), which makes the network's input
invariant to such affine intensity shifts, and brightness / contrast jitter covers the residual; both are
train-time choices that never look at test images (no test-time batch statistics or BN re-estimation).

Training scales out under ``torchrun`` (DistributedDataParallel, one process per GPU, a global batch split
over the processes and, where memory asks for it, accumulated micro-batches) and survives preemption: with a
checkpoint folder it commits a resumable checkpoint (``state.json`` written last) every few epochs and a re-run
continues the same trajectory from it. Sampling and augmentation are functions of the seed, epoch and image
index, which is what makes both exact.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import timm
import timm.data
import timm.layers
import timm.loss
import timm.optim
import timm.scheduler
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.data
from PIL import Image

from realfake.classify_checkpoint import (
    CHECKPOINT_STATE,
    Trainables,
    commit_checkpoint,
    open_store,
    read_checkpoint,
    recipe,
    restore,
)
from realfake.classify_data import EpochKeys, Transformed, TransformedStream, seed_worker
from realfake.config import BuildConfig, ClassifierConfig
from realfake.distributed import Ranks, join_process_group, process_rank

if TYPE_CHECKING:
    from realfake.data.storage import Store

__all__ = [
    "CHECKPOINT_STATE",
    "BatchSchedule",
    "Classifier",
    "PerImageStandardize",
    "batch_schedule",
    "build_classifier",
    "build_transforms",
    "evaluate",
    "extract_features",
    "predict",
    "process_rank",
    "train_classifier",
]

log = logging.getLogger(__name__)


class PerImageStandardize:
    """Scale one image tensor to zero mean and unit variance over all its pixels and channels.

    Accepts the uint8 or float tensor that timm's transforms produce without normalisation. A constant
    image has no contrast to normalise; it is only centred (the standard deviation is floored at
    ``1/sqrt(numel)``, as TensorFlow's ``per_image_standardization`` does).
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        floor = 1.0 / math.sqrt(x.numel())
        return (x - x.mean()) / x.std(unbiased=False).clamp_min(floor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _mean_std(cfg: ClassifierConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pcfg = timm.models.get_pretrained_cfg(cfg.model)
    if pcfg is not None and pcfg.mean is not None and pcfg.std is not None:
        return tuple(pcfg.mean), tuple(pcfg.std)
    return timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD


def build_transforms(cfg: ClassifierConfig, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalised CHW float tensor, built by ``timm.data.create_transform``.

    Training applies RandomResizedCrop (``scale``, ``ratio``), ``hflip`` and either ``auto_augment`` or
    ``color_jitter``; evaluation resizes and centre-crops with ``crop_pct``. Normalisation is the model's
    mean/std or per-image standardisation (``input_norm``).
    """
    per_image = cfg.input_norm == "per_image"
    mean, std = _mean_std(cfg)
    kwargs: dict[str, Any] = dict(
        input_size=cfg.image_size,
        is_training=train,
        interpolation="bilinear",
        mean=mean,
        std=std,
        normalize=not per_image,
    )
    if train:
        kwargs.update(
            scale=tuple(cfg.scale),
            ratio=tuple(cfg.ratio),
            hflip=cfg.hflip,
            color_jitter=cfg.color_jitter,
            auto_augment=cfg.auto_augment,
        )
    else:
        kwargs.update(crop_pct=cfg.crop_pct)
    transform = timm.data.create_transform(**kwargs)
    if per_image:
        transform.transforms.append(PerImageStandardize())
    return transform


class Classifier(nn.Module):
    """A timm network plus the recipe it was built with and the matching evaluation transform.

    ``forward`` returns logits; :meth:`features` returns the pooled penultimate features.
    """

    def __init__(self, net: nn.Module, cfg: ClassifierConfig, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.num_classes = num_classes
        self.eval_transform = build_transforms(cfg, train=False)
        self.train_log: list[dict[str, float]] = []
        self.resumed_from_epoch = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


def build_classifier(cfg: ClassifierConfig, num_classes: int) -> Classifier:
    """Create the timm model of the recipe, seeded by ``cfg.seed`` so that initial weights are reproducible.

    With ``pretrained=True`` timm loads ImageNet weights by name (hub cache) or from the file given by
    ``model_kwargs.pretrained_cfg_overlay = {file: ...}``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    torch.manual_seed(cfg.seed)
    try:
        net = timm.create_model(
            cfg.model,
            pretrained=cfg.pretrained,
            num_classes=num_classes,
            drop_path_rate=cfg.drop_path_rate,
            **cfg.model_kwargs,
        )
    except RuntimeError as e:
        if cfg.model not in timm.list_models(pretrained=False):
            raise ValueError(f"classifier.model = {cfg.model!r} is not a timm model name") from e
        raise
    return Classifier(net, cfg, num_classes)


def _loss_fn(cfg: ClassifierConfig, mixing: bool) -> nn.Module:
    # Same choice as timm's train.py: mixup/cutmix produce soft targets, so they need a soft-target loss.
    if mixing and cfg.bce_loss:
        return timm.loss.BinaryCrossEntropy(target_threshold=None)
    if mixing:
        return timm.loss.SoftTargetCrossEntropy()
    if cfg.bce_loss:
        return timm.loss.BinaryCrossEntropy(smoothing=cfg.label_smoothing)
    if cfg.label_smoothing > 0:
        return timm.loss.LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return nn.CrossEntropyLoss()


def _autocast(device: torch.device, cfg: ClassifierConfig) -> tuple[torch.autocast | None, bool]:
    if not (cfg.amp and device.type == "cuda"):
        return None, False
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), False
    return torch.autocast("cuda", dtype=torch.float16), True


def _epoch_images(train_set: torch.utils.data.Dataset, n: int, ranks: Ranks, device: torch.device) -> int:
    """Images one epoch holds over all processes: what a checkpoint records as ``train_images``.

    ``n`` for a map-style dataset (every process holds it whole); a stream's ``len()`` is this process's share
    (padded to the ranks), so its ``total`` where it has one (``StreamingImages``: every selected image once,
    whatever the number of processes), else the sum of the processes' shares.
    """
    if not isinstance(train_set, torch.utils.data.IterableDataset):
        return n
    total = getattr(train_set, "total", None)
    if isinstance(total, int):
        return total
    if ranks.world == 1:
        return n
    shares = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(shares)
    return int(shares.item())


class BatchSchedule(NamedTuple):
    """How one epoch is cut into optimiser steps (:func:`batch_schedule`)."""

    steps_per_epoch: int  # optimiser steps (global batches) per epoch
    micro_batch: int  # images per process in one forward/backward pass
    accumulation: int  # micro-batches per step in each process (all of them when the data hold under one global batch)
    processes: int
    global_batch: int  # classifier.batch_size
    images_per_epoch: int  # images trained on per epoch over all processes (a partial last global batch is dropped)
    drop_last: bool  # the loader drops a short last micro-batch (map-style data only)


def batch_schedule(
    cfg: ClassifierConfig | BuildConfig, n_images: int, processes: int = 1, streamed: bool = False
) -> BatchSchedule:
    """Steps per epoch and per-process micro-batch of training on ``n_images`` with ``processes`` processes.

    The arithmetic :func:`train_classifier` uses, without training: every step takes ``cfg.batch_size`` images
    (``micro_batch`` per process x ``processes`` x ``cfg.gradient_accumulation``); an epoch of map-style data
    holds ``n_images // batch_size`` steps (a partial last global batch is dropped, as ``drop_last``), except that
    data holding less than one global batch train as one step per epoch. ``streamed`` data (shards read as a
    stream, split by the stream itself) keep short batches, so the last step of an epoch may be partial.

    Raises:
        ValueError: ``batch_size`` does not divide into ``processes x gradient_accumulation`` micro-batches.
    """
    cfg = cfg.classifier if isinstance(cfg, BuildConfig) else cfg
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    return _schedule(cfg, math.ceil(n_images / processes), processes, streamed)


def _schedule(cfg: ClassifierConfig, share: int, world: int, streamed: bool) -> BatchSchedule:
    """:func:`batch_schedule` from this process's ``share`` of an epoch's images."""
    micro, accum = cfg.micro_batch(world), cfg.gradient_accumulation
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    if streamed:  # the stream's own batches, short ones included; a short last group is stepped too
        micro = min(micro, share)
        steps = math.ceil(math.ceil(share / micro) / accum)
        return BatchSchedule(steps, micro, accum, world, cfg.batch_size, share * world, False)
    if share >= micro * accum:  # whole global batches; the partial last one is not drawn at all
        steps = share // (micro * accum)
        return BatchSchedule(steps, micro, accum, world, cfg.batch_size, steps * cfg.batch_size, True)
    # Less than one global batch per process (a demo-sized set): the whole epoch is one step.
    micro = min(micro, share)
    drop = mixing  # mixup needs even pairs; otherwise every image of the epoch counts
    passes = share // micro if drop else math.ceil(share / micro)
    return BatchSchedule(1, micro, max(passes, 1), world, cfg.batch_size, min(share, passes * micro) * world, drop)


def _flag_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Each item with whether it is the last one (one item of look-ahead)."""
    it = iter(items)
    try:
        held = next(it)
    except StopIteration:
        return
    for item in it:
        yield held, False
        held = item
    yield held, True


def train_classifier(
    train_set: torch.utils.data.Dataset,
    num_classes: int,
    cfg: ClassifierConfig,
    device: str | torch.device = "cpu",
    progress: bool = False,
    checkpoint: Store | str | None = None,
) -> Classifier:
    """Train ``cfg.model`` from scratch (or ImageNet weights) on ``train_set`` with the recipe in ``cfg``.

    Launched by torchrun (``WORLD_SIZE`` > 1 in the environment), every process calls this with the same
    arguments: it joins the process group (NCCL on CUDA, gloo on CPU), trains its share of each global batch
    of ``cfg.batch_size`` under DistributedDataParallel, and returns the same weights in every process. Each
    process passes ``cfg.gradient_accumulation`` micro-batches of ``batch_size / (world_size x accumulation)``
    images per optimiser step (:func:`batch_schedule`; the arithmetic is logged at the start), their losses
    weighted so the step is the one of the whole global batch. Sampling and augmentation depend only on the
    seed, epoch and image index, so with per-image normalisation (GroupNorm, or batch norm synchronised by
    ``cfg.sync_bn``) and no mixup, ``w`` processes follow the trajectory of one up to floating-point summation
    order; with plain batch norm each process normalises its own share (and each micro-batch its own), as in
    timm's distributed training.

    With ``checkpoint``, a resumable checkpoint is written every ``cfg.checkpoint_every_epochs`` epochs and
    after the last one (by rank 0 only), and training resumes from the committed one found there: weights,
    optimizer, scheduler, gradient scaler, epoch, train log and every process's RNG states, so the resumed run
    continues the interrupted trajectory. The caller removes the folder once it has kept the result.

    Args:
        train_set: Yields ``(image, label)``; PIL images get :func:`build_transforms` (train), tensors are used
            as they are. A map-style dataset is shuffled here; an ``IterableDataset`` (streamed shards) orders
            and splits itself over processes and workers, gets ``set_epoch(epoch)`` if it has one, and its
            ``len()`` is one epoch's images in this process (its ``total``, where it has one, is the epoch's
            images over all processes, which a checkpoint records). Only the map-style path makes sampling
            independent of the number of processes and workers; a stream's augmentation is seeded per image
            where it names its images (``iter_keyed``), else per rank, worker and position (see
            :class:`~realfake.classify_data.TransformedStream`).
        num_classes: Width of the classifier head; labels must lie in ``[0, num_classes)``.
        cfg: The recipe: model, optimizer, schedule, augmentation, loss and seed.
        device: Torch device to train on (a distributed run uses ``cuda:LOCAL_RANK`` for ``cuda``).
        progress: Show a progress bar over epochs (rank 0).
        checkpoint: Folder (local path, fsspec URI or :class:`~realfake.data.storage.Store`) of the checkpoint.

    Returns:
        The trained :class:`Classifier` in eval mode; its ``train_log`` attribute holds one dict per epoch and
        ``resumed_from_epoch`` the epoch a checkpoint supplied (0 for a fresh run).
    """
    try:
        n = len(train_set)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"{type(train_set).__name__} has no len(): an iterable train_set must say how many images one epoch "
            "yields in this process, which sizes the schedule"
        ) from None
    if n == 0:
        raise ValueError("train_set is empty: nothing to train the classifier on")
    store = open_store(checkpoint)
    ranks, device = join_process_group(torch.device(device))
    try:
        return _train(train_set, n, num_classes, cfg, device, progress, store, ranks)
    finally:
        if ranks.owned:
            dist.destroy_process_group()


def _train(
    train_set: torch.utils.data.Dataset,
    n: int,
    num_classes: int,
    cfg: ClassifierConfig,
    device: torch.device,
    progress: bool,
    store: Store | None,
    ranks: Ranks,
) -> Classifier:
    streamed = isinstance(train_set, torch.utils.data.IterableDataset)
    # The stream's len() is already this process's share; the sampler gives each process ceil(n / world).
    sched = _schedule(cfg, n if streamed else math.ceil(n / ranks.world), ranks.world, streamed)
    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    if mixing and sched.micro_batch % 2:
        raise ValueError(
            f"mixup/cutmix pair images inside a micro-batch of {sched.micro_batch} per process, which must be even; "
            "change classifier.batch_size (or classifier.gradient_accumulation)"
        )
    if ranks.rank == 0:
        log.info("%s; %d optimiser steps per epoch", cfg.batch_arithmetic(ranks.world), sched.steps_per_epoch)
    # Rank 0 keeps the one-process streams; other ranks draw their own (dropout, drop-path, mixup), as timm does.
    random.seed(cfg.seed + ranks.rank)
    np.random.seed(cfg.seed + ranks.rank)
    model = build_classifier(cfg, num_classes).to(device)
    if ranks.rank:
        torch.manual_seed(cfg.seed + ranks.rank)
    net = model.net
    if ranks.world > 1 and cfg.sync_bn:
        if device.type == "cuda":
            # timm's conversion also keeps the activation of its fused BatchNormAct layers; on a copy, since it
            # shares parameters with the layers it replaces.
            net = timm.layers.convert_sync_batchnorm(copy.deepcopy(model.net))
        elif any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
            log.warning("classifier.sync_bn needs CUDA: batch norm on %s normalises each process's share", device)

    train_transform = build_transforms(cfg, train=True)
    dataset: Transformed | TransformedStream
    if streamed:
        sampler = None
        dataset = TransformedStream(train_set, train_transform, seed=cfg.seed, rank=ranks.rank)
    else:
        whole = sched.steps_per_epoch * sched.micro_batch * sched.accumulation  # this process's whole global batches
        sampler = EpochKeys(n, cfg.seed, ranks.rank, ranks.world, take=whole)
        dataset = Transformed(train_set, train_transform, seed=cfg.seed)
    # Mixup pairs samples inside a batch and needs an even batch size, hence drop_last when mixing. A stream is
    # batched inside each DataLoader worker, so drop_last would drop every worker's remainder (and a worker whose
    # share is under one batch would yield nothing): streams keep their short batches, trimmed to even for mixup.
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=sched.micro_batch,
        sampler=sampler,
        drop_last=sched.drop_last,
        num_workers=cfg.workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
    )
    if len(loader) == 0:
        raise ValueError(f"train_set has {n} images, fewer than one even batch; lower classifier.batch_size")
    mixup_fn = None
    if mixing:
        mixup_fn = timm.data.Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )
    criterion = _loss_fn(cfg, mixing).to(device)
    optimizer = timm.optim.create_optimizer_v2(
        net, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    # Stepped per update, so warm-up and cosine are smooth even for the few epochs of a demo; epoch-valued
    # milestones keep their meaning because timm scales them by updates_per_epoch.
    scheduler, num_epochs = timm.scheduler.create_scheduler_v2(
        optimizer,
        sched=cfg.sched,
        num_epochs=cfg.epochs,
        decay_milestones=list(cfg.decay_milestones),
        decay_rate=cfg.decay_rate,
        warmup_epochs=cfg.warmup_epochs,
        step_on_epochs=False,
        updates_per_epoch=sched.steps_per_epoch,
    )
    autocast, use_scaler = _autocast(device, cfg)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    start, updates = 0, 0
    trainables = Trainables(net, optimizer, scheduler, scaler)
    epoch_images = _epoch_images(train_set, n, ranks, device)  # over all processes: any world size resumes
    saved = read_checkpoint(store, cfg, num_classes, epoch_images) if store is not None else None
    if saved is not None:
        start, updates = int(saved["epoch"]), int(saved["updates"])
        model.train_log = list(saved["train_log"])
        model.resumed_from_epoch = start
        restore(saved["payload"], trainables, ranks, device, seed=cfg.seed + ranks.rank + 1_000_003 * start)
        log.info("resuming %s from epoch %d/%d (%s)", cfg.model, start, num_epochs, store.uri())
    trained = net
    if ranks.world > 1:
        # Wrapping broadcasts rank 0's weights; every rank then applies the same averaged gradients.
        trained = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    epochs: Iterable[int] = range(start, num_epochs)
    if progress and ranks.rank == 0:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=f"train {cfg.model}", unit="epoch", initial=start, total=num_epochs)
    shown = _progress(store, cfg, num_epochs, start, n) if ranks.rank == 0 else None
    for epoch in epochs:
        (sampler or dataset).set_epoch(epoch)
        trained.train()
        t0, total_loss, seen, correct = time.perf_counter(), 0.0, 0, torch.zeros((), dtype=torch.long, device=device)
        # One optimiser step per group of sched.accumulation micro-batches: each micro-batch's mean loss is
        # weighted by its share of the group's images, so the summed gradient is the group's mean, as one pass
        # over the whole global batch would give; DDP synchronises only on a group's last micro-batch.
        group, expected = sched.accumulation, sched.accumulation * sched.micro_batch
        in_group, group_images = 0, 0
        optimizer.zero_grad(set_to_none=True)
        for (images, labels), last in _flag_last(loader):
            in_group += 1
            final = in_group == group or last
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
            if mixup_fn is not None and len(labels) % 2:  # a stream worker's last, short batch
                images, labels = images[:-1], labels[:-1]
            if len(labels):
                targets = labels
                if mixup_fn is not None:
                    images, targets = mixup_fn(images, labels)
                sync = contextlib.nullcontext() if final or ranks.world == 1 else trained.no_sync()
                with sync:
                    with autocast if autocast is not None else contextlib.nullcontext():
                        logits = trained(images)
                        loss = criterion(logits, targets)
                    correct += (logits.detach().argmax(1) == labels).sum()  # on the device: no sync per batch
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"training loss became {loss.item()} at epoch {epoch}; lower classifier.lr ({cfg.lr})"
                        )
                    weighted = loss if group == 1 else loss * (len(labels) / expected)
                    (scaler.scale(weighted) if scaler is not None else weighted).backward()
                group_images += len(labels)
                total_loss += loss.item() * len(labels)
                seen += len(labels)
            if not final or not group_images:
                continue
            if group > 1:
                _mean_over_group(net, group_images, expected, ranks, device, streamed)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            in_group, group_images = 0, 0
            updates += 1
            scheduler.step_update(num_updates=updates)
        if not seen:
            raise ValueError(f"epoch {epoch + 1} gave no training batch from {n} images; lower classifier.batch_size "
                             f"({cfg.batch_size}) or classifier.workers ({cfg.workers})")
        scheduler.step(epoch + 1)
        if ranks.world > 1:  # the logged loss is the mean over every process's images
            sums = torch.tensor([total_loss, float(seen), float(correct)], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            total_loss, seen, correct = float(sums[0]), int(sums[1]), sums[2]
        entry = {
            "epoch": epoch + 1,
            "loss": total_loss / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        model.train_log.append(entry)
        if shown is not None:
            shown.update(epoch + 1, loss=entry["loss"], train_accuracy=float(correct) / max(seen, 1))
        if ranks.rank == 0:
            log.info(
                "epoch %d/%d loss %.4f lr %.4g (%.1fs)",
                epoch + 1,
                num_epochs,
                entry["loss"],
                entry["lr"],
                entry["seconds"],
            )
        every = cfg.checkpoint_every_epochs
        if store is not None and every and ((epoch + 1) % every == 0 or epoch + 1 == num_epochs):
            state = {
                "epoch": epoch + 1,
                "updates": updates,
                "train_log": model.train_log,
                "world_size": ranks.world,
                "recipe": recipe(cfg),
                "num_classes": num_classes,
                "train_images": epoch_images,
            }
            commit_checkpoint(store, state, trainables, ranks, device)
    if net is not model.net:  # SyncBatchNorm copy: the returned model keeps plain batch norm
        model.net.load_state_dict(net.state_dict())
    return model.eval()


def _mean_over_group(
    net: nn.Module, images: int, expected: int, ranks: Ranks, device: torch.device, streamed: bool
) -> None:
    """Rescale accumulated gradients weighted for ``expected`` images per process to the mean over the group's.

    Map-style groups are always whole (or equally short on every process); a stream's groups can be short, and
    differently so on each process, so their image counts are summed over the processes first.
    """
    total = images * ranks.world
    if streamed and ranks.world > 1:
        count = torch.tensor([images], dtype=torch.float64, device=device)
        dist.all_reduce(count)
        total = int(count.item())
    if total != expected * ranks.world:
        factor = expected * ranks.world / total
        for p in net.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)


@torch.inference_mode()
def _run(model: nn.Module, dataset: torch.utils.data.Dataset, device: str | torch.device, transform: Callable | None,
         batch_size: int, features: bool) -> tuple[np.ndarray, np.ndarray]:
    """Logits (or ``features``) and labels of ``dataset`` in order, preprocessed by ``transform`` (default: the
    model's ``eval_transform``)."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    transform = transform if transform is not None else getattr(model, "eval_transform", None)
    loader = torch.utils.data.DataLoader(Transformed(dataset, transform), batch_size=batch_size, shuffle=False)
    outs, labels = [], []
    for images, ys in loader:
        images = images.to(device)
        if features:
            if hasattr(model, "features"):
                out = model.features(images)
            elif hasattr(model, "forward_head"):
                out = model.forward_head(model.forward_features(images), pre_logits=True)
            else:
                raise TypeError(f"{type(model).__name__} has neither features() nor timm's forward_head()")
        else:
            out = model(images)
        outs.append(out.float().cpu())
        labels.append(ys)
    model.train(was_training)
    if not outs:
        raise ValueError("the dataset is empty")
    return torch.cat(outs).numpy(), torch.cat(labels).numpy()


def predict(model: nn.Module, dataset: torch.utils.data.Dataset, device: str | torch.device = "cpu",
            transform: Callable | None = None, batch_size: int = 256) -> np.ndarray:
    """Class probabilities (softmax), shape ``(len(dataset), num_classes)``, in dataset order."""
    logits, _ = _run(model, dataset, device, transform, batch_size, features=False)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def extract_features(model: nn.Module, dataset: torch.utils.data.Dataset, device: str | torch.device = "cpu",
                     transform: Callable | None = None, batch_size: int = 256) -> np.ndarray:
    """Pooled penultimate features (the input of the classifier head), shape ``(len(dataset), dim)``."""
    feats, _ = _run(model, dataset, device, transform, batch_size, features=True)
    return feats


def evaluate(
    model: nn.Module,
    test_set: torch.utils.data.Dataset,
    num_classes: int,
    device: str | torch.device = "cpu",
    transform: Callable | None = None,
    class_subset: Sequence[int] | None = None,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Accuracy of ``model`` on ``test_set``.

    Args:
        model: Returns logits over ``num_classes`` classes.
        test_set: Yields ``(image, label)``.
        num_classes: Number of classes of the label space.
        device: Torch device.
        transform: Preprocessing of PIL images (default: the model's ``eval_transform``).
        class_subset: Restrict the prediction to these class indices before the argmax, as for ImageNet-R /
            -A (200 of 1000 classes); labels stay in the full index space and must belong to the subset.
        batch_size: Images per forward pass.

    Returns:
        ``top1`` and ``top5`` accuracy (top-k with k = min(5, classes considered)), ``per_class`` accuracy
        (list indexed by class, ``None`` for classes absent from the test set), ``confusion``
        (``num_classes`` x ``num_classes`` counts, rows = true class) and ``n``.
    """
    logits, labels = _run(model, test_set, device, transform, batch_size, features=False)
    if logits.shape[1] != num_classes:
        raise ValueError(f"the model returns {logits.shape[1]} logits but num_classes is {num_classes}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"test labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    candidates = np.arange(num_classes)
    if class_subset is not None:
        candidates = np.asarray(sorted(set(int(c) for c in class_subset)))
        if candidates.size == 0 or candidates.min() < 0 or candidates.max() >= num_classes:
            raise ValueError(f"class_subset must hold class indices in [0, {num_classes})")
        outside = np.setdiff1d(np.unique(labels), candidates)
        if outside.size:
            raise ValueError(f"test labels {outside[:10].tolist()} are not in class_subset")
    sub = logits[:, candidates]
    # Stable sort so ties resolve to the lower class index, the same as argmax.
    order = np.argsort(-sub, axis=1, kind="stable")
    ranked = candidates[order]
    pred = ranked[:, 0]
    k = min(5, len(candidates))
    top5 = float(np.mean(np.any(ranked[:, :k] == labels[:, None], axis=1)))
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(axis=1)
    per_class = [float(confusion[c, c] / support[c]) if support[c] else None for c in range(num_classes)]
    return {
        "top1": float(np.mean(pred == labels)),
        "top5": top5,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "n": int(len(labels)),
    }


def _progress(store: Store | None, cfg: ClassifierConfig, epochs: int, start: int, images: int) -> Any:
    """Throttled progress lines of one training run, named after the version and run of its checkpoint folder
    (``{dataset}/{version}/runs/{run}/checkpoint``) when it has one."""
    from realfake.progress import StageProgress

    parts = store.root.rstrip("/").split("/") if store is not None else []
    if len(parts) >= 5 and parts[-3] == "runs":
        dataset, version, run = parts[-5], parts[-4], parts[-2]
    else:
        dataset, version, run = "classifier", cfg.model, None
    return StageProgress("classifier", epochs, "epoch", dataset, version, scope=run, samples_per_unit=images,
                         start=start)
