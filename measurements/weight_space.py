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

__all__ = ["bootstrap_barriers", "interpolate", "loss_barrier", "module_criticality", "negative_variance", "noise_scales",
           "parameter_distance", "perturb", "scaled_distance_sq"]


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


def negative_variance(state: dict[str, Tensor]) -> bool:
    """Whether a state dict's batch-norm variance (``running_var``) has a negative entry, as moments extrapolated
    beyond [0, 1] can: that network is undefined (its normalisation divides by the variance's square root). Between
    0 and 1 interpolated variances are convex combinations of variances, never negative."""
    return any(bool((v < 0).any()) for k, v in state.items() if k.endswith("running_var"))


def loss_barrier(lams: Sequence[float], values: Sequence[float]) -> float:
    """B = max over lam in [0, 1] of L(lam) - ((1 - lam) L(0) + lam L(1)): how far the path rises above the
    straight line between its ends (0 for a linear path; points outside [0, 1] are curve, not barrier)."""
    lams, values = np.asarray(lams, dtype=float), np.asarray(values, dtype=float)
    if 0.0 not in lams or 1.0 not in lams:
        raise ValueError(f"The barrier needs lam = 0 and lam = 1 in the grid (the two networks), got {lams.tolist()}.")
    start, end = values[lams == 0.0][0], values[lams == 1.0][0]
    inside = (lams >= 0) & (lams <= 1)
    return float(np.max(values[inside] - ((1 - lams[inside]) * start + lams[inside] * end)))


def bootstrap_barriers(lams: Sequence[float], losses: np.ndarray, hits: np.ndarray, labels: np.ndarray,
                       measure: str = "top1", resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile intervals (``level``) of the loss and error barriers (``loss_barrier``) over the images,
    resampled with replacement ``resamples`` times (one resample of images for every lam, so a resample is a
    path on other data): ``losses`` and ``hits`` are images x lams, the error is 1 - the measure (top-1, or the
    mean over classes of per-class accuracy, over the classes a resample holds)."""
    lams = np.asarray(lams, dtype=float)
    n = len(labels)
    if n == 0:
        return {"loss_barrier_interval": None, "error_barrier_interval": None}
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples).astype(float)  # R x n
    loss = counts @ losses / n
    if measure == "top1":
        accuracy = counts @ hits / n
    else:
        per_class = [(counts[:, labels == c] @ hits[labels == c], counts[:, labels == c].sum(1, keepdims=True))
                     for c in np.unique(labels)]
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.nanmean(np.stack([c / k for c, k in per_class]), axis=0)  # a class left out of a resample: not counted
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    return {f"{name}_barrier_interval": np.percentile(_barriers(lams, values), tails).tolist()
            for name, values in (("loss", loss), ("error", 1 - accuracy))}


def _barriers(lams: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``loss_barrier`` of every row of ``values`` (rows x lams)."""
    start, end = values[:, lams == 0.0][:, 0], values[:, lams == 1.0][:, 0]
    inside = (lams >= 0) & (lams <= 1)
    chord = (1 - lams[inside]) * start[:, None] + lams[inside] * end[:, None]
    return (values[:, inside] - chord).max(1)


def parameter_distance(a: dict[str, Tensor], b: dict[str, Tensor], parts: dict[str, list[str]]) -> dict[str, float]:
    """||theta_a - theta_b||_2 over all the parameters of ``parts`` ("all") and over each part's ({part: names})."""
    distance = {}
    for part, names in parts.items():
        distance[part] = math.sqrt(sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in names))
    distance["all"] = math.sqrt(sum(d**2 for d in distance.values()))
    return distance


def shared_parts(a: dict[str, Tensor], b: dict[str, Tensor], parts: dict[str, list[str]]) -> tuple[dict[str, list[str]], list[str]]:
    """``parts`` restricted to the parameters that ``a`` and ``b`` both hold with equal shapes, parts left with none
    dropped; and the names left out, in order (a head of another task's classes: a pre-trained network against one
    fine-tuned from it). ``parameter_distance`` over the first is the distance of what the two networks share."""
    kept: dict[str, list[str]] = {}
    left_out: list[str] = []
    for part, names in parts.items():
        for name in names:
            if name in a and name in b and a[name].shape == b[name].shape:
                kept.setdefault(part, []).append(name)
            else:
                left_out.append(name)
    return kept, left_out


def noise_scales(final: dict[str, Tensor], names: list[str]) -> dict[str, float]:
    """Each tensor's root mean square, ||theta_t^F||_F / sqrt(numel): the unit of its noise, so that the noise is
    proportional to each weight matrix's Frobenius norm (Neyshabur et al. 2020) and one grid of relative sigmas suits
    tensors of any size and scale. A tensor that is all zeros has no scale (0) and is left unperturbed."""
    return {n: math.sqrt(float(final[n].double().pow(2).mean())) for n in names}


def scaled_distance_sq(final: dict[str, Tensor], initial: dict[str, Tensor], scales: dict[str, float]) -> float:
    """sum over the module's tensors of ||theta_t^F - theta_t^0||_F^2 / s_t^2: the squared distance in units of each
    tensor's noise scale (tensors without a scale left out), so that (alpha / sigma)^2 times it is
    alpha^2 ||theta_i^F - theta_i^0||^2 / sigma^2 with every tensor's sigma the std actually added to it."""
    return sum(float((final[n].double() - initial[n].double()).pow(2).sum()) / s**2 for n, s in scales.items() if s > 0)


def perturb(initial: dict[str, Tensor], final: dict[str, Tensor], alpha: float, stds: dict[str, float],
            generator: torch.Generator) -> dict[str, Tensor]:
    """Module i's weights at (alpha, sigma) in Chatterji et al.'s definition: (1 - alpha) theta_t^0 + alpha theta_t^F
    plus isotropic Gaussian noise of std ``stds[t]`` for every tensor t of the module, a fresh draw from
    ``generator`` for every call (so every noise draw of a point perturbs every parameter of the module)."""
    out = {}
    for name, std in stds.items():
        x = torch.lerp(initial[name].to(final[name].dtype), final[name], alpha)
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device)
        out[name] = x + std * noise.to(x.device)
    return out


def module_criticality(alphas: Sequence[float], sigmas: Sequence[float], values: np.ndarray, bound: float,
                       distance_sq: float) -> Optional[float]:
    """mu_i = min over admissible (alpha, sigma) of (alpha / sigma)^2 D_i (Chatterji et al. 2020, Definition 1), with
    D_i the module's squared distance from its initial weights in units of its noise (``scaled_distance_sq``;
    sigma relative to those units). (alpha, sigma) is admissible when ``values[a, s]``, the train 0-1 error (or
    loss) averaged over the noise draws, is at most ``bound``. A module that can be rewound far and shaken hard
    without cost has a small mu: it is not critical. None when no point of the grid is admissible (the module is
    more critical than the grid can tell; refine the grid towards alpha = 1 and small sigma)."""
    alphas, sigmas, values = np.asarray(alphas, float), np.asarray(sigmas, float), np.asarray(values, float)
    if values.shape != (len(alphas), len(sigmas)):
        raise ValueError(f"values must be alphas x sigmas = {(len(alphas), len(sigmas))}, got {values.shape}.")
    admissible = values <= bound
    if not admissible.any():
        return None
    mu = (alphas[:, None] / sigmas[None, :]) ** 2 * distance_sq
    return float(mu[admissible].min())
