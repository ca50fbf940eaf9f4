"""The fine-tuning objective: min-SNR weighted diffusion loss plus a distribution-matching (MMD) term.

``L = mean_i w_i ||eps_i - eps_theta_i||^2 / D  +  mmd_weight * MMD``. With the linear kernel the MMD is
the squared distance of the (weighted) batch sums of prediction and target, ``||sum_i w_i (eps_i -
eps_theta_i)||^2 / D`` (METHOD.md): it pulls the generator's batch statistics toward the real batch's
rather than only each sample toward its own target. The RBF option is a characteristic kernel, for users
who want every moment matched.
"""

from __future__ import annotations

import torch

__all__ = ["min_snr_weights", "mmd_linear", "mmd_rbf", "realfake_loss", "snr"]


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma weights for epsilon prediction: ``min(SNR, gamma) / SNR`` (ones when gamma is None)."""
    if gamma is None:
        return torch.ones(timesteps.shape[0], device=timesteps.device)
    s = snr(alphas_cumprod, timesteps)
    return torch.clamp(s, max=gamma) / s


def mmd_linear(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Linear-kernel MMD: ``||sum_i w_i (target_i - pred_i)||^2 / D`` with D elements per sample."""
    diff = (target.float() - pred.float()).flatten(1)
    s = (weights.float()[:, None] * diff).sum(0)
    return (s * s).sum() / diff.shape[1]


def mmd_rbf(pred: torch.Tensor, target: torch.Tensor, bandwidth: float | None = None) -> torch.Tensor:
    """Biased MMD^2 between the prediction and target sets with a Gaussian kernel (median heuristic)."""
    x = pred.float().flatten(1)
    y = target.float().flatten(1)
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    if bandwidth is None:
        bw = d2.detach()[d2.detach() > 0].median().clamp_min(1e-8)
    else:
        bw = torch.tensor(bandwidth**2, device=z.device)
    k = torch.exp(-d2 / bw)
    n = x.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def realfake_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, mmd_weight: float,
                  kernel: str = "linear") -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts for logging: ``diffusion``, ``mmd`` and ``mmd_batch``, the number of samples the
    MMD term was taken over (the whole of ``pred``; 0 when the term is off).

    ``mmd_weight`` multiplies the linear MMD on *sums*: its effect grows with the batch (on means, the same term
    at batch B is ``mmd_weight * B**2``), so a weight is tied to the batch it was tuned at (0.003 at 8 images).
    """
    per_sample = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
    diffusion = (weights.float() * per_sample).mean()
    if mmd_weight > 0:
        mmd = mmd_linear(pred, target, weights) if kernel == "linear" else mmd_rbf(pred, target)
    else:
        mmd = torch.zeros((), device=pred.device)
    total = diffusion + mmd_weight * mmd
    return total, {"diffusion": float(diffusion.detach()), "mmd": float(mmd.detach()),
                   "mmd_batch": pred.shape[0] if mmd_weight > 0 else 0}
