"""The classifier stage on real handwriting (scikit-learn digits) and on hand-made logits.

The transfer test is the one the demo depends on: a classifier trained on images whose intensity
distribution differs from the test images (grey background, halved contrast, as a tiny generator produces)
must not collapse. It trains the naive recipe as a control, so the test also proves that the shift is
hard enough to collapse a recipe that lacks the protection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from sklearn.datasets import load_digits
from support.train_digits import digits as small_digits

from realfake.classify import (
    CHECKPOINT_STATE,
    Classifier,
    PerImageStandardize,
    build_classifier,
    build_transforms,
    evaluate,
    extract_features,
    predict,
    train_classifier,
)
from realfake.config import ClassifierConfig
from realfake.data.loaders import LabelledImages

# The small recipe the tests share: a narrow timm ResNet-18 at 32 px, SGD + cosine, digit-safe augmentation.
SMALL = dict(
    model="resnet18",
    model_kwargs={"channels": [16, 32, 64, 128]},
    image_size=32,
    epochs=5,
    batch_size=64,
    lr=0.1,
    sched="cosine",
    warmup_epochs=1,
    weight_decay=5e-4,
    hflip=0.0,
    scale=(0.8, 1.0),
    ratio=(0.85, 1.18),
    color_jitter=0.4,
    crop_pct=1.0,
    input_norm="per_image",
    workers=0,
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this module with one intra-op thread (conftest's ``one_thread``)."""


def _digit(x: np.ndarray, contrast: float = 1.0, offset: float = 0.0) -> Image.Image:
    x = np.clip(x * contrast + offset, 0, 255).astype(np.uint8)
    return Image.fromarray(x).resize((32, 32), Image.BILINEAR).convert("RGB")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = load_digits()
    images = d.images * (255.0 / 16.0)
    perm = np.random.default_rng(0).permutation(len(d.target))
    tr, te = perm[:1400], perm[1400:]
    return images[tr], d.target[tr], images[te], d.target[te]


def _pairs(images: np.ndarray, labels: np.ndarray, **shift: float) -> LabelledImages:
    return LabelledImages([(_digit(x, **shift), int(y)) for x, y in zip(images, labels, strict=True)])


# -- transforms ---------------------------------------------------------------------------------------------------
def test_train_transform_without_randomness_equals_eval_transform():
    cfg = ClassifierConfig(**{**SMALL, "scale": (1.0, 1.0), "ratio": (1.0, 1.0), "color_jitter": 0.0})
    image = _digit(load_digits().images[3] * 16)
    assert torch.equal(build_transforms(cfg, train=True)(image), build_transforms(cfg, train=False)(image))


def test_model_normalisation_uses_timm_mean_and_std():
    cfg = ClassifierConfig(**{**SMALL, "input_norm": "model"})
    image = Image.new("RGB", (32, 32), (255, 128, 0))
    out = build_transforms(cfg, train=False)(image)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics of timm's resnet18 weights
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 128, 0), mean, std, strict=True)]
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out[:, 0, 0], torch.tensor(expected), atol=1e-5)


def test_per_image_standardisation_removes_brightness_and_contrast():
    cfg = ClassifierConfig(**SMALL)
    digit = load_digits().images[5] * 10  # 0..160, so the affine shift below never clips
    t = build_transforms(cfg, train=False)
    a, b = t(_digit(digit)), t(_digit(digit, contrast=0.5, offset=90))
    assert abs(a.mean().item()) < 1e-5 and a.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert (a - b).abs().max().item() < 0.05  # equal up to 8-bit rounding
    flat = PerImageStandardize()(torch.full((3, 4, 4), 9, dtype=torch.uint8))
    assert torch.all(flat == 0)  # a constant image is centred, not divided by zero


# -- training on real handwriting ---------------------------------------------------------------------------------
def test_synthetic_style_training_transfers_to_real_digits_where_a_naive_recipe_collapses(digits):
    x_tr, y_tr, x_te, y_te = digits
    shift = dict(contrast=0.5, offset=100.0)  # grey background, half contrast: a generator's typical drift
    train_shifted = _pairs(x_tr, y_tr, **shift)
    test_real = _pairs(x_te, y_te)

    robust = train_classifier(train_shifted, 10, ClassifierConfig(**SMALL))
    in_domain = evaluate(robust, _pairs(x_te, y_te, **shift), 10)
    transfer = evaluate(robust, test_real, 10)
    assert in_domain["top1"] > 0.9
    assert transfer["top1"] > 0.9, f"synthetic-to-real transfer collapsed: {transfer['top1']:.3f}"
    assert len(robust.train_log) == SMALL["epochs"] and robust.train_log[-1]["loss"] < robust.train_log[0]["loss"]

    naive_cfg = ClassifierConfig(
        **{**SMALL, "input_norm": "model", "color_jitter": 0.0, "scale": (1.0, 1.0), "ratio": (1.0, 1.0)}
    )
    naive = train_classifier(train_shifted, 10, naive_cfg)
    naive_transfer = evaluate(naive, test_real, 10)["top1"]
    assert naive_transfer < 0.6, f"control: the shift no longer breaks the naive recipe ({naive_transfer:.3f})"


def test_training_is_reproducible_for_a_seed(digits):
    x_tr, y_tr, _, _ = digits
    data = _pairs(x_tr[:128], y_tr[:128])
    cfg = ClassifierConfig(**{**SMALL, "epochs": 1, "batch_size": 32})
    a, b = train_classifier(data, 10, cfg), train_classifier(data, 10, cfg)
    c = train_classifier(data, 10, cfg.model_copy(update={"seed": 1}))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.net.fc.weight, c.net.fc.weight)


@pytest.mark.parametrize("preset", ["imagenette", "in100", "in1k", "cub", "cars", "pets", "eurosat", "demo"])
def test_every_preset_recipe_builds_and_trains_a_few_steps(digits, preset):
    """The shipped Tab. 8 recipes, exactly as configured (ResNet-50, their optimiser, schedule, augmentation, loss),
    at 32 px for two optimiser steps; ImageNet weights (CUB/Cars/Pets) are off: nothing is downloaded here."""
    from realfake.config import load_config

    recipe = load_config(preset=preset, overrides=["source.uri=/unused"]).classifier
    cfg = recipe.model_copy(update={"image_size": 32, "epochs": 1, "batch_size": 8, "pretrained": False,
                                    "workers": 0})
    x_tr, y_tr, _, _ = digits
    model = train_classifier(_pairs(x_tr[:16], y_tr[:16]), 10, cfg)
    assert model.cfg.model == recipe.model and np.isfinite(model.train_log[0]["loss"])


def test_paper_in1k_style_recipe_trains(digits):
    # The IN-1K row of Tab. 8 at toy scale: LAMB, cosine + warm-up, label smoothing, stochastic depth,
    # RandAugment 7/0.5, mixup 0.2, cutmix 1.0, BCE loss; each piece through timm's factories.
    x_tr, y_tr, _, _ = digits
    cfg = ClassifierConfig(
        model="resnet18",
        model_kwargs={"channels": [16, 32, 64, 128]},
        image_size=32,
        epochs=2,
        batch_size=32,
        opt="lamb",
        lr=5e-3,
        weight_decay=0.02,
        sched="cosine",
        warmup_epochs=1,
        label_smoothing=0.1,
        drop_path_rate=0.05,
        auto_augment="rand-m7-mstd0.5",
        mixup=0.2,
        cutmix=1.0,
        bce_loss=True,
        workers=0,
    )
    model = train_classifier(_pairs(x_tr[:96], y_tr[:96]), 10, cfg)
    assert len(model.train_log) == 2 and all(np.isfinite(e["loss"]) for e in model.train_log)
    assert model.train_log[0]["lr"] != model.train_log[1]["lr"]


# -- predict / features / evaluate ----------------------------------------------------------------------------------
def test_predict_and_features_agree_with_the_head(digits):
    x_tr, y_tr, _, _ = digits
    model = build_classifier(ClassifierConfig(**SMALL), 10).eval()
    data = _pairs(x_tr[:20], y_tr[:20])
    probs = predict(model, data)
    feats = extract_features(model, data, batch_size=7)
    assert probs.shape == (20, 10) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert feats.shape == (20, model.net.num_features)
    logits = model.net.get_classifier()(torch.from_numpy(feats))
    assert np.allclose(torch.softmax(logits, 1).detach().numpy(), probs, atol=1e-5)


class _LogitsAreInputs(nn.Module):
    """A fixed 'model' whose logits are its input vectors, for hand-checked evaluation cases."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_evaluate_matches_a_hand_computed_case():
    logits = torch.tensor(
        [
            [9, 1, 2, 3, 4, 5, 0, 0],  # true 0, predicted 0
            [1, 9, 2, 3, 4, 5, 0, 0],  # true 1, predicted 1
            [1, 2, 9, 3, 4, 5, 0, 6],  # true 1, predicted 2; class 1 ranks 6th of 8 -> outside top-5
            [1, 2, 3, 9, 4, 5, 8, 0],  # true 6, predicted 3; class 6 ranks 2nd -> inside top-5
        ],
        dtype=torch.float32,
    )
    labels = [0, 1, 1, 6]
    data = [(row, y) for row, y in zip(logits, labels, strict=True)]
    out = evaluate(_LogitsAreInputs(), data, 8)
    assert out["top1"] == pytest.approx(2 / 4) and out["top5"] == pytest.approx(3 / 4) and out["n"] == 4
    assert out["per_class"] == [1.0, 0.5, None, None, None, None, 0.0, None]
    confusion = np.zeros((8, 8), dtype=int)
    for t, p in [(0, 0), (1, 1), (1, 2), (6, 3)]:
        confusion[t, p] += 1
    assert out["confusion"] == confusion.tolist()

    # ImageNet-R/-A style: only classes {0, 1, 6} are candidates, so row 3 now predicts 6 and row 2 predicts 1.
    sub = evaluate(_LogitsAreInputs(), data, 8, class_subset=[6, 0, 1])
    assert sub["top1"] == 1.0 and sub["top5"] == 1.0
    with pytest.raises(ValueError, match="not in class_subset"):
        evaluate(_LogitsAreInputs(), data, 8, class_subset=[0, 1])


def test_errors_name_the_fix(digits):
    x_tr, y_tr, _, _ = digits
    data = _pairs(x_tr[:4], y_tr[:4])
    with pytest.raises(TypeError, match="build_transforms"):
        predict(nn.Identity(), data)
    model = build_classifier(ClassifierConfig(**SMALL), 10)
    with pytest.raises(ValueError, match="num_classes is 5"):
        evaluate(model, data, 5)
    with pytest.raises(ValueError, match="not a timm model name"):
        build_classifier(ClassifierConfig(**{**SMALL, "model": "resnet_does_not_exist"}), 10)
    with pytest.raises(ValueError, match="empty"):
        train_classifier(LabelledImages([]), 10, ClassifierConfig(**SMALL))
    assert isinstance(model, Classifier)


# -- checkpoints and resume -------------------------------------------------------------------------------------------
TRAIN_DIGITS = Path(__file__).parent / "support" / "train_digits.py"
# 16 px digits with random crops, flips and jitter, mixup (numpy's RNG) and stochastic depth (torch's), so a resume
# must reproduce the augmentation draws and the training loop's own random streams.
RESUMABLE = dict(
    model="resnet18",
    model_kwargs={"channels": [8, 16, 32, 64]},
    drop_path_rate=0.1,
    mixup=0.2,
    image_size=16,
    epochs=5,
    batch_size=32,
    lr=0.05,
    sched="cosine",
    hflip=0.5,
    scale=(0.7, 1.0),
    color_jitter=0.3,
    input_norm="per_image",
    workers=0,
)


def _assert_same_weights(a: nn.Module, b: nn.Module, atol: float) -> None:
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(wb, wa, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_a_run_killed_after_a_checkpoint_resumes_on_the_same_trajectory(tmp_path):
    cfg = ClassifierConfig(**RESUMABLE)
    ckpt, out = tmp_path / "checkpoint", tmp_path / "never.pt"
    proc = subprocess.Popen([sys.executable, str(TRAIN_DIGITS), cfg.model_dump_json(), str(out), "256", str(ckpt)])
    try:
        deadline = time.monotonic() + 600
        while not (ckpt / CHECKPOINT_STATE).exists():
            assert proc.poll() is None, f"the training process exited {proc.returncode} before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
            time.sleep(0.01)
    finally:
        proc.kill()  # SIGKILL: no handler runs, as when a node is preempted
        proc.wait()
    state = json.loads((ckpt / CHECKPOINT_STATE).read_text())
    assert 1 <= state["epoch"] < cfg.epochs and not out.exists(), "the process was killed too late to test a resume"

    data = small_digits(256)
    resumed = train_classifier(data, 10, cfg, checkpoint=str(ckpt))
    reference = train_classifier(data, 10, cfg)
    assert resumed.resumed_from_epoch == state["epoch"] and reference.resumed_from_epoch == 0
    assert [e["loss"] for e in resumed.train_log[: state["epoch"]]] == [e["loss"] for e in state["train_log"]]
    # Same operations in the same order on the same CPU: equal to the last bit in practice; the tolerance only
    # allows for rounding, while a resume that redrew any batch or augmentation moves weights by ~1e-2.
    assert [e["loss"] for e in resumed.train_log] == pytest.approx([e["loss"] for e in reference.train_log], abs=1e-6)
    _assert_same_weights(reference, resumed, atol=1e-6)
    control = train_classifier(data, 10, cfg.model_copy(update={"seed": 1}))
    assert (control.net.fc.weight - reference.net.fc.weight).abs().max() > 1e-3

    # After the last epoch the checkpoint holds exactly that epoch, and a re-run only loads it.
    assert sorted(os.listdir(ckpt)) == [f"epoch-{cfg.epochs:05d}.pt", CHECKPOINT_STATE]
    again = train_classifier(data, 10, cfg, checkpoint=str(ckpt))
    assert again.resumed_from_epoch == cfg.epochs and len(again.train_log) == cfg.epochs
    _assert_same_weights(resumed, again, atol=0)


def test_a_checkpoint_of_another_recipe_or_without_its_weights_is_refused(tmp_path):
    data = small_digits(64)
    cfg = ClassifierConfig(**{**RESUMABLE, "epochs": 1})
    train_classifier(data, 10, cfg, checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match=r"differs in: classifier\.lr\).*remove that folder"):
        train_classifier(data, 10, cfg.model_copy(update={"lr": 0.1}), checkpoint=str(tmp_path))
    with pytest.raises(ValueError, match="differs in: train_images"):
        train_classifier(small_digits(96), 10, cfg, checkpoint=str(tmp_path))
    # How a run executes is not part of its recipe: more loader workers resume the same checkpoint.
    more_workers = cfg.model_copy(update={"workers": 2})
    assert train_classifier(data, 10, more_workers, checkpoint=str(tmp_path)).resumed_from_epoch == 1
    (tmp_path / "epoch-00001.pt").unlink()
    with pytest.raises(FileNotFoundError, match="epoch-00001.pt, which is missing"):
        train_classifier(data, 10, cfg, checkpoint=str(tmp_path))


def test_checkpoint_every_zero_writes_nothing(tmp_path):
    cfg = ClassifierConfig(**{**RESUMABLE, "epochs": 1, "checkpoint_every_epochs": 0})
    assert train_classifier(small_digits(64), 10, cfg, checkpoint=str(tmp_path / "c")).resumed_from_epoch == 0
    assert not (tmp_path / "c").exists()


def test_augmentation_is_a_function_of_seed_epoch_and_image(digits):
    from realfake.classify_data import Transformed as _Transformed

    x_tr, y_tr, _, _ = digits
    cfg = ClassifierConfig(**RESUMABLE)
    data = _Transformed(_pairs(x_tr[:4], y_tr[:4]), build_transforms(cfg, train=True), seed=cfg.seed)
    before = torch.get_rng_state()
    first, again, later = data[(0, 2)][0], data[(0, 2)][0], data[(1, 2)][0]
    assert torch.equal(first, again) and not torch.equal(first, later)
    assert torch.equal(before, torch.get_rng_state())  # the training loop's own stream is left alone
    # Hence the result does not depend on which process loads an image: loader workers train the same weights.
    images = small_digits(64)
    one = ClassifierConfig(**{**RESUMABLE, "epochs": 1})
    in_process = train_classifier(images, 10, one)
    _assert_same_weights(in_process, train_classifier(images, 10, one.model_copy(update={"workers": 2})), atol=1e-6)


def test_mixup_needs_an_even_batch():
    cfg = ClassifierConfig(**{**RESUMABLE, "mixup": 0.2, "batch_size": 15})
    with pytest.raises(ValueError, match="must be even; change classifier.batch_size"):
        train_classifier(small_digits(64), 10, cfg)


class _Stream(torch.utils.data.IterableDataset):
    """A dataset that streams its own seeded order per epoch, as the shard streaming reader does."""

    def __init__(self, pairs: LabelledImages, sized: bool = True) -> None:
        self.pairs, self.sized, self.epochs = pairs, sized, []

    def __len__(self) -> int:
        if not self.sized:
            raise TypeError("unsized stream")
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        order = np.random.default_rng([0, self.epochs[-1]]).permutation(len(self.pairs))
        return (self.pairs[int(i)] for i in order)


def test_an_iterable_dataset_streams_its_own_epochs_and_resumes(tmp_path):
    cfg = ClassifierConfig(**{**RESUMABLE, "epochs": 2, "drop_path_rate": 0.0, "mixup": 0.0})
    stream = _Stream(small_digits(64))
    model = train_classifier(stream, 10, cfg, checkpoint=str(tmp_path))
    assert stream.epochs == [0, 1] and len(model.train_log) == 2
    assert model.train_log[-1]["loss"] < model.train_log[0]["loss"]
    assert json.loads((tmp_path / CHECKPOINT_STATE).read_text())["train_images"] == 64
    again = _Stream(small_digits(64))
    assert train_classifier(again, 10, cfg, checkpoint=str(tmp_path)).resumed_from_epoch == 2 and again.epochs == []
    with pytest.raises(TypeError, match="_Stream has no len\\(\\): an iterable train_set must say how many images"):
        train_classifier(_Stream(small_digits(64), sized=False), 10, cfg)
