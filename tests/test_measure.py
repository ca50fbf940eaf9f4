"""Measures against independent computations: MMD against a double loop, FD against closed forms and scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from PIL import Image

from realfake.data.loaders import LabelledImages
from realfake.measure import feature_mmd, frechet_distance, label_fidelity, median_bandwidth


def _mmd_double_loop(x: np.ndarray, y: np.ndarray, k) -> float:
    """Textbook unbiased MMD^2 (Gretton et al. 2012, eq. 3), one kernel call per pair."""
    n, m = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return sxx + syy - 2 * sxy


@pytest.fixture
def tiny_sets() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.normal(size=(9, 4)), rng.normal(0.5, 1.3, size=(6, 4))


def test_rbf_mmd_matches_double_loop(tiny_sets):
    x, y = tiny_sets
    bw = 1.7
    expected = _mmd_double_loop(x, y, lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * bw**2)))
    assert feature_mmd(x, y, "rbf", bandwidth=bw) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_linear_and_poly_mmd_match_double_loop(tiny_sets):
    x, y = tiny_sets
    d = x.shape[1]
    assert feature_mmd(x, y, "linear") == pytest.approx(_mmd_double_loop(x, y, np.dot), rel=1e-10)
    poly = _mmd_double_loop(x, y, lambda a, b: (np.dot(a, b) / d + 1) ** 3)
    assert feature_mmd(x, y, "poly") == pytest.approx(poly, rel=1e-10)


def test_median_bandwidth_is_the_median_pairwise_distance(tiny_sets):
    x, y = tiny_sets
    pooled = np.concatenate([x, y])
    dists = [np.linalg.norm(pooled[i] - pooled[j]) for i in range(len(pooled)) for j in range(i + 1, len(pooled))]
    assert median_bandwidth(x, y) == pytest.approx(float(np.median(dists)), rel=1e-12)
    bw = float(np.median(dists))
    assert feature_mmd(x, y) == pytest.approx(feature_mmd(x, y, bandwidth=bw), rel=1e-12)


def test_mmd_blocks_agree_with_one_block(monkeypatch):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 3)), rng.normal(0.3, 1.0, size=(37, 3))
    whole = feature_mmd(x, y, bandwidth=1.0)
    monkeypatch.setattr("realfake.measure._BLOCK", 8)  # force many blocks, uneven last block
    assert feature_mmd(x, y, bandwidth=1.0) == pytest.approx(whole, rel=1e-12)


def test_mmd_separates_shifted_from_same_distribution():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    shifted = rng.normal(0.5, 1.0, size=(300, 8))
    same, diff = feature_mmd(a, b), feature_mmd(a, shifted)
    assert abs(same) < 0.01 < diff
    # linear-kernel MMD^2 estimates |mu_x - mu_y|^2 = 8 * 0.25 = 2
    assert feature_mmd(a, shifted, "linear") == pytest.approx(2.0, abs=0.3)


def test_frechet_identical_sets_is_zero():
    x = np.random.default_rng(2).normal(size=(200, 16))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_matches_scipy_sqrtm_on_sample_moments():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(80, 5)) @ rng.normal(size=(5, 5))
    y = rng.normal(1.0, 2.0, size=(60, 5))
    mx, my = x.mean(0), y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(sx @ sy).real
    expected = np.sum((mx - my) ** 2) + np.trace(sx + sy - 2 * covmean)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)


def test_frechet_of_shifted_gaussians_matches_closed_form():
    # N(0, diag(s1)) vs N(mu, diag(s2)): FD = |mu|^2 + sum (sqrt(s1) - sqrt(s2))^2
    rng = np.random.default_rng(4)
    mu = np.array([1.0, -2.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([2.25, 1.0, 0.25])
    x = rng.normal(size=(200_000, 3)) * np.sqrt(s1)
    y = mu + rng.normal(size=(200_000, 3)) * np.sqrt(s2)
    closed = mu @ mu + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(x, y) == pytest.approx(closed, rel=0.01)


@pytest.mark.parametrize("fn", [feature_mmd, frechet_distance])
def test_bad_inputs_name_the_problem(fn):
    with pytest.raises(ValueError, match="same feature width"):
        fn(np.zeros((4, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fn(np.zeros((1, 3)), np.ones((4, 3)))
    with pytest.raises(ValueError, match="2-D"):
        fn(np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        fn(np.full((3, 2), np.nan), np.ones((3, 2)))


class _BrightnessBucket(nn.Module):
    """A fixed classifier: class = mean intensity of the (un-normalised) image, bucketed into 4 classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bucket = (x.mean(dim=(1, 2, 3)) * 4).clamp(0, 3.999).floor().long()
        return torch.nn.functional.one_hot(bucket, 4).float()


def test_label_fidelity_is_accuracy_of_the_real_model_on_synthetic_images():
    levels = [10, 80, 150, 220]  # mean/255 falls in buckets 0, 1, 2, 3
    labels = [0, 1, 2, 3, 3, 2, 1, 0]  # intended labels; the first four match the drawn brightness
    pairs = [(Image.new("RGB", (8, 8), (v, v, v)), lab) for v, lab in zip(levels * 2, labels, strict=True)]
    model = _BrightnessBucket()
    model.eval_transform = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
    assert label_fidelity(model, LabelledImages(pairs), 4, "cpu") == pytest.approx(4 / 8)
