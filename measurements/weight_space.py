"""Weight-space measurements of Neyshabur et al. (2020): interpolation between two networks and its loss
barrier, parameter distance, and module criticality (Chatterji et al. 2020). Pure functions of state dicts
and of losses already evaluated; the passes that evaluate networks live in ``study/transfer.py``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["interpolate", "loss_barrier", "parameter_distance", "perturb", "module_criticality", "sigma_scale"]


def interpolate(a: dict[str, Tensor], b: dict[str, Tensor], lam: float) -> dict[str, Tensor]:
    """theta(lam) = (1 - lam) a + lam b for every floating-point entry of two state dicts (weights, and batch-norm
    running moments, which a caller that follows the protocol recomputes afterwards); integer entries
    (``num_batches_tracked``) are counters, never interpolated: they are a's. lam outside [0, 1] extrapolates."""
    if a.keys() != b.keys():
        missing = sorted(set(a) ^ set(b))[:5]
        raise ValueError(f"The two networks' state dicts differ in their entries (e.g. {missing}): interpolate networks "
                         f"of one architecture.")
    out = {}
    for key, x in a.items():
        y = b[key]
        if x.shape != y.shape:
            raise ValueError(f"{key} has shape {tuple(x.shape)} in one network and {tuple(y.shape)} in the other: "
                             f"interpolate networks of one architecture.")
        # torch.lerp computes x + lam (y - x) below lam = 0.5 and y - (1 - lam)(y - x) above: x and y bit for bit
        # at the ends, so the path's ends are the networks themselves.
        out[key] = torch.lerp(x, y.to(x.dtype), lam) if x.is_floating_point() else x.clone()
    return out


def loss_barrier(lams: Sequence[float], values: Sequence[float]) -> float:
    """B = max over lam in [0, 1] of L(lam) - ((1 - lam) L(0) + lam L(1)): how far the path rises above the
    straight line between its ends (0 for a linear path; points outside [0, 1] are curve, not barrier)."""
    lams, values = np.asarray(lams, dtype=float), np.asarray(values, dtype=float)
    if 0.0 not in lams or 1.0 not in lams:
        raise ValueError(f"The barrier needs lam = 0 and lam = 1 in the grid (the two networks), got {lams.tolist()}.")
    start, end = values[lams == 0.0][0], values[lams == 1.0][0]
    inside = (lams >= 0) & (lams <= 1)
    return float(np.max(values[inside] - ((1 - lams[inside]) * start + lams[inside] * end)))


def parameter_distance(a: dict[str, Tensor], b: dict[str, Tensor], parts: dict[str, list[str]]) -> dict[str, float]:
    """||theta_a - theta_b||_2 over all the parameters of ``parts`` ("all") and over each part's ({part: names})."""
    distance = {}
    for part, names in parts.items():
        distance[part] = math.sqrt(sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in names))
    distance["all"] = math.sqrt(sum(d**2 for d in distance.values()))
    return distance


def sigma_scale(final: dict[str, Tensor], names: list[str]) -> float:
    """The root mean square of a module's final weights: the unit of its noise grid, so one grid of relative
    sigmas suits modules of any size and scale."""
    total = sum(float(final[n].double().pow(2).sum()) for n in names)
    count = sum(final[n].numel() for n in names)
    return math.sqrt(total / count)


def perturb(initial: dict[str, Tensor], final: dict[str, Tensor], names: list[str], alpha: float, sigma: float,
            generator: torch.Generator) -> dict[str, Tensor]:
    """Module i's weights at (alpha, sigma) in Chatterji et al.'s definition: (1 - alpha) theta_i^0 + alpha theta_i^F
    plus isotropic Gaussian noise of std sigma, a fresh draw from ``generator`` for every call (so every noise
    draw of a point perturbs every parameter of the module)."""
    out = {}
    for name in names:
        x = torch.lerp(initial[name].to(final[name].dtype), final[name], alpha)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
        out[name] = x + sigma * noise.to(x.device)
    return out


def module_criticality(alphas: Sequence[float], sigmas: Sequence[float], losses: np.ndarray, final_loss: float,
                       distance_sq: float, epsilon: float = 0.01) -> Optional[float]:
    """mu_i = min over admissible (alpha, sigma) of (alpha / sigma)^2 ||theta_i^F - theta_i^0||_F^2, where (alpha, sigma)
    is admissible when the mean loss over the noise draws, ``losses[a, s]``, is at most (1 + epsilon) times the
    final network's loss (Chatterji et al. 2020, Definition 1). A module that can be rewound far and shaken
    hard without cost has a small mu: it is not critical. None when no point of the grid is admissible (the
    module is more critical than the grid can tell; refine the grid towards alpha = 1 and small sigma)."""
    alphas, sigmas, losses = np.asarray(alphas, float), np.asarray(sigmas, float), np.asarray(losses, float)
    if losses.shape != (len(alphas), len(sigmas)):
        raise ValueError(f"losses must be alphas x sigmas = {(len(alphas), len(sigmas))}, got {losses.shape}.")
    admissible = losses <= (1 + epsilon) * final_loss
    if not admissible.any():
        return None
    mu = (alphas[:, None] / sigmas[None, :]) ** 2 * distance_sq
    return float(mu[admissible].min())
