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
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import timm
import timm.data
import timm.loss
import timm.optim
import timm.scheduler
import torch
import torch.nn as nn
import torch.utils.data
from PIL import Image

from realfake.config import ClassifierConfig

__all__ = [
    "Classifier",
    "PerImageStandardize",
    "build_classifier",
    "build_transforms",
    "evaluate",
    "extract_features",
    "predict",
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


class _Transformed(torch.utils.data.Dataset):
    """Applies a transform to datasets that yield PIL images; tensors pass through unchanged."""

    def __init__(self, dataset: torch.utils.data.Dataset, transform: Callable | None) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        if isinstance(image, Image.Image):
            if self.transform is None:
                raise TypeError(
                    "the dataset yields PIL images but no transform is known: pass transform="
                    "build_transforms(cfg, train=False) or a model returned by train_classifier"
                )
            image = self.transform(image)
        return image, int(label)


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


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


def train_classifier(
    train_set: torch.utils.data.Dataset,
    num_classes: int,
    cfg: ClassifierConfig,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Classifier:
    """Train ``cfg.model`` from scratch (or ImageNet weights) on ``train_set`` with the recipe in ``cfg``.

    Args:
        train_set: Yields ``(image, label)``; PIL images get :func:`build_transforms` (train), tensors are used
            as they are.
        num_classes: Width of the classifier head; labels must lie in ``[0, num_classes)``.
        cfg: The recipe: model, optimizer, schedule, augmentation, loss and seed.
        device: Torch device to train on.
        progress: Show a progress bar over epochs.

    Returns:
        The trained :class:`Classifier` in eval mode; its ``train_log`` attribute holds one dict per epoch.
    """
    n = len(train_set)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("train_set is empty: nothing to train the classifier on")
    device = torch.device(device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model = build_classifier(cfg, num_classes).to(device)

    mixing = cfg.mixup > 0 or cfg.cutmix > 0
    # Mixup pairs samples inside a batch and needs an even batch size, hence drop_last when mixing.
    drop_last = mixing or n > cfg.batch_size
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        _Transformed(train_set, build_transforms(cfg, train=True)),
        batch_size=min(cfg.batch_size, n),
        shuffle=True,
        drop_last=drop_last,
        num_workers=cfg.workers,
        worker_init_fn=_seed_worker,
        generator=generator,
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
        model.net, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
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
        updates_per_epoch=len(loader),
    )
    autocast, use_scaler = _autocast(device, cfg)
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    updates = 0
    epochs = range(num_epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=f"train {cfg.model}", unit="epoch")
    for epoch in epochs:
        model.train()
        start, total_loss, seen = time.perf_counter(), 0.0, 0
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
            targets = labels
            if mixup_fn is not None:
                images, targets = mixup_fn(images, labels)
            if autocast is not None:
                with autocast:
                    loss = criterion(model(images), targets)
            else:
                loss = criterion(model(images), targets)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch}; lower classifier.lr ({cfg.lr})"
                )
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            updates += 1
            scheduler.step_update(num_updates=updates)
            total_loss += loss.item() * len(labels)
            seen += len(labels)
        scheduler.step(epoch + 1)
        entry = {
            "epoch": epoch + 1,
            "loss": total_loss / max(seen, 1),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - start,
        }
        model.train_log.append(entry)
        log.info(
            "epoch %d/%d loss %.4f lr %.4g (%.1fs)", epoch + 1, num_epochs, entry["loss"], entry["lr"], entry["seconds"]
        )
    return model.eval()


def _loader(
    model: nn.Module, dataset: torch.utils.data.Dataset, transform: Callable | None, batch_size: int
) -> torch.utils.data.DataLoader:
    transform = transform if transform is not None else getattr(model, "eval_transform", None)
    return torch.utils.data.DataLoader(_Transformed(dataset, transform), batch_size=batch_size, shuffle=False)


@torch.inference_mode()
def _run(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    device: str | torch.device,
    transform: Callable | None,
    batch_size: int,
    features: bool,
) -> tuple[np.ndarray, np.ndarray]:
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    outs, labels = [], []
    for images, ys in _loader(model, dataset, transform, batch_size):
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


def predict(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    device: str | torch.device = "cpu",
    transform: Callable | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Class probabilities (softmax), shape ``(len(dataset), num_classes)``, in dataset order."""
    logits, _ = _run(model, dataset, device, transform, batch_size, features=False)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def extract_features(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    device: str | torch.device = "cpu",
    transform: Callable | None = None,
    batch_size: int = 256,
) -> np.ndarray:
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
