"""Distances between real and synthetic image sets, and label fidelity: the measures that explain a score.

Accuracy of a classifier trained on synthetic data says how good a dataset is; these measures say why.
:func:`feature_mmd` is the unbiased squared maximum mean discrepancy between two feature sets (the quantity
Real-Fake's fine-tuning loss drives down), with an RBF kernel (median-heuristic bandwidth), a linear kernel
(distance of means) or KID's cubic polynomial kernel. :func:`frechet_distance` is the FID formula applied to
whatever features are given (the demo uses the pooled features of one fixed classifier, not Inception).
:func:`label_fidelity` is the accuracy of a classifier trained on real data when it labels synthetic images:
low fidelity means the generator draws the wrong class, whatever the distances say. All computations run in
float64 on NumPy.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.utils.data

__all__ = ["feature_mmd", "frechet_distance", "label_fidelity", "median_bandwidth"]

Kernel = Literal["rbf", "linear", "poly"]
_BLOCK = 2048  # rows per kernel block: bounds memory to ~32 MB per block pair in float64


def _as_features(a: np.ndarray, name: str, min_rows: int) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples x features), got shape {a.shape}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} samples, got {a.shape[0]}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)  # rounding can make tiny distances negative


def median_bandwidth(x: np.ndarray, y: np.ndarray, max_points: int = 1000, seed: int = 0) -> float:
    """Median Euclidean distance between distinct points of the pooled sample (the median heuristic).

    At most ``max_points`` points are drawn (without replacement, fixed seed) so the cost stays bounded.
    """
    pooled = np.concatenate([_as_features(x, "x", 1), _as_features(y, "y", 1)])
    if len(pooled) > max_points:
        pooled = pooled[np.random.default_rng(seed).choice(len(pooled), max_points, replace=False)]
    d = np.sqrt(_sq_dists(pooled, pooled)[np.triu_indices(len(pooled), k=1)])
    d = d[d > 0]
    if d.size == 0:
        raise ValueError("all points are identical: the median-heuristic bandwidth is undefined; pass bandwidth")
    return float(np.median(d))


def _kernel_sum(a: np.ndarray, b: np.ndarray, kernel: Kernel, gamma: float) -> float:
    """Sum of k(a_i, b_j) over all pairs, computed block by block."""
    total = 0.0
    for i in range(0, len(a), _BLOCK):
        ai = a[i : i + _BLOCK]
        for j in range(0, len(b), _BLOCK):
            bj = b[j : j + _BLOCK]
            if kernel == "rbf":
                total += float(np.exp(-gamma * _sq_dists(ai, bj)).sum())
            elif kernel == "linear":
                total += float((ai @ bj.T).sum())
            else:
                total += float((((ai @ bj.T) / a.shape[1] + 1.0) ** 3).sum())
    return total


def _kernel_diag_sum(a: np.ndarray, kernel: Kernel) -> float:
    if kernel == "rbf":
        return float(len(a))  # k(x, x) = 1
    sq = (a * a).sum(1)
    if kernel == "linear":
        return float(sq.sum())
    return float(((sq / a.shape[1] + 1.0) ** 3).sum())


def feature_mmd(x: np.ndarray, y: np.ndarray, kernel: Kernel = "rbf", bandwidth: float | None = None) -> float:
    """Unbiased estimate of the squared MMD between the distributions of feature sets ``x`` and ``y``.

    ``MMD^2 = mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)``; being unbiased
    it can be slightly negative when the distributions are equal.

    Args:
        x: Features of the first set, shape ``(n, d)``, ``n >= 2``.
        y: Features of the second set, shape ``(m, d)``, ``m >= 2``.
        kernel: ``rbf``: ``exp(-|a-b|^2 / (2 bandwidth^2))``; ``linear``: ``a.b`` (squared distance of the
            means, as in Real-Fake's loss); ``poly``: ``(a.b / d + 1)^3`` (the kernel of KID).
        bandwidth: RBF length scale; ``None`` uses :func:`median_bandwidth` of the pooled sample.
    """
    x = _as_features(x, "x", 2)
    y = _as_features(y, "y", 2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature width, got {x.shape[1]} and {y.shape[1]}")
    if kernel not in ("rbf", "linear", "poly"):
        raise ValueError(f"kernel must be 'rbf', 'linear' or 'poly', got {kernel!r}")
    gamma = 0.0
    if kernel == "rbf":
        if bandwidth is None:
            bandwidth = median_bandwidth(x, y)
        if not bandwidth > 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        gamma = 1.0 / (2.0 * bandwidth**2)
    n, m = len(x), len(y)
    kxx = (_kernel_sum(x, x, kernel, gamma) - _kernel_diag_sum(x, kernel)) / (n * (n - 1))
    kyy = (_kernel_sum(y, y, kernel, gamma) - _kernel_diag_sum(y, kernel)) / (m * (m - 1))
    kxy = _kernel_sum(x, y, kernel, gamma) / (n * m)
    return float(kxx + kyy - 2.0 * kxy)


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to ``x`` and ``y`` (the FID formula on given features).

    ``|mu_x - mu_y|^2 + Tr(S_x + S_y - 2 (S_x S_y)^{1/2})`` with unbiased sample covariances. The trace of the
    matrix square root is computed as ``sum sqrt(eig(S_x^{1/2} S_y S_x^{1/2}))``, a symmetric PSD form that
    has the same eigenvalues as ``S_x S_y`` and avoids the complex round-off of a general ``sqrtm``.
    """
    x = _as_features(x, "x", 2)
    y = _as_features(y, "y", 2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature width, got {x.shape[1]} and {y.shape[1]}")
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x = np.atleast_2d(np.cov(x, rowvar=False))
    s_y = np.atleast_2d(np.cov(y, rowvar=False))
    root_x = _sqrt_psd(s_x)
    middle = root_x @ s_y @ root_x
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum())
    diff = mu_x - mu_y
    value = float(diff @ diff + np.trace(s_x) + np.trace(s_y) - 2.0 * tr_sqrt)
    return max(value, 0.0)  # the exact value is >= 0; round-off can leave -1e-12


def label_fidelity(
    real_model: torch.nn.Module,
    synthetic_set: torch.utils.data.Dataset,
    num_classes: int,
    device: str | torch.device = "cpu",
) -> float:
    """Top-1 accuracy of a classifier trained on real images when it labels the synthetic images.

    ``real_model`` is typically returned by :func:`realfake.classify.train_classifier` and carries its own
    evaluation transform; ``synthetic_set`` yields ``(image, intended label)``.
    """
    from realfake.classify import evaluate  # measure stays importable without timm until fidelity is asked for

    return float(evaluate(real_model, synthetic_set, num_classes, device)["top1"])
