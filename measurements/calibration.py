"""Calibration: negative log-likelihood and expected calibration error, before and after temperature
scaling (Kornblith et al. 2021, Table C.3; Guo et al. 2017, "On calibration of modern neural networks").

Probabilities from logits z (N×K), at temperature T (1 before scaling):

    softmax:             p_k = exp(z_k/T) / Σ_j exp(z_j/T)
    sigmoid_normalised:  p_k = σ(z_k/T) / Σ_j σ(z_j/T)   (Table C.3: a sigmoid-trained network's per-class
                         probabilities, normalised to sum to one)

    NLL = −(1/N) Σ_i log p_{y_i}(z_i)
    ECE = Σ_b (n_b/N) |acc_b − conf_b|, over 15 equal-width bins of the confidence max_k p_k, bin b being
          ((b−1)/B, b/B] (Guo et al.'s B_m); acc_b the fraction of its examples whose argmax is the label,
          conf_b their mean confidence, empty bins contributing nothing.

Temperature scaling fits one T > 0 minimising the NLL on a hold-out set (the paper: 50,046 held-out
ImageNet training images) and reports NLL and ECE at that T on the evaluation set. Everything is
computed in float64, the NLL from log-probabilities so that confident mistakes do not underflow to
log 0.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .lbfgs import minimise

__all__ = [
    "ProbabilityKind",
    "probabilities",
    "negative_log_likelihood",
    "expected_calibration_error",
    "fit_temperature",
    "calibration_statistics",
]

ProbabilityKind = Literal["softmax", "sigmoid_normalised"]
KINDS = ("softmax", "sigmoid_normalised")


def probabilities(logits: Tensor, kind: ProbabilityKind = "softmax", temperature: float = 1.0) -> Tensor:
    """Class probabilities (N×K, float64, rows summing to one) from ``logits`` at ``temperature``."""
    _check_logits(logits, kind, temperature=temperature)
    return _log_probabilities(logits.double() / temperature, kind).exp()


def negative_log_likelihood(
    logits: Tensor, labels: Tensor, kind: ProbabilityKind = "softmax", temperature: float = 1.0
) -> float:
    """Mean −log p_{y_i} (natural log), p from ``probabilities(logits, kind, temperature)``."""
    _check_logits(logits, kind, labels, temperature)
    return float(F.nll_loss(_log_probabilities(logits.double() / temperature, kind), labels.long()))


def expected_calibration_error(probs: Tensor, labels: Tensor, num_bins: int = 15) -> float:
    """ECE of class probabilities ``probs`` (N×K) against integer ``labels`` (N): ``num_bins`` equal-width
    bins (lo, hi] of the confidence max_k p_k, Σ_b (n_b/N) |acc_b − conf_b|."""
    _check_shapes("probs", probs, labels)
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or bool((probs > 1).any()):
        raise ValueError("expected calibration error: probs must be finite and lie in [0, 1].")
    if num_bins < 1:
        raise ValueError(f"expected calibration error: num_bins must be >= 1, got {num_bins}.")
    confidence, prediction = probs.double().max(1)
    correct = (prediction == labels).double()
    upper_edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64, device=probs.device)[1:]
    # right=False: bin b holds edges[b−1] < confidence <= edges[b], Guo et al.'s ((b−1)/B, b/B].
    bins = torch.bucketize(confidence, upper_edges, right=False)
    # Σ_b (n_b/N)|acc_b − conf_b| = (1/N) Σ_b |Σ_{i∈b} (correct_i − confidence_i)|
    gap = torch.zeros(num_bins, dtype=torch.float64, device=probs.device).index_add_(0, bins, correct - confidence)
    return float(gap.abs().sum() / len(labels))


def fit_temperature(logits: Tensor, labels: Tensor, kind: ProbabilityKind = "softmax") -> float:
    """The T > 0 minimising ``negative_log_likelihood(logits, labels, kind, T)`` (Guo et al. 2017).

    Minimises over u = log T (T stays positive; steps are relative) from T = 1 with ``lbfgs.minimise``,
    whose Wolfe line search is correct off convexity too, until |dNLL/du| ≤ 1e-10 or the NLL stops
    decreasing in float64. For softmax the NLL is convex in 1/T (a log-sum-exp of the logits times 1/T,
    less a term linear in 1/T), though not in u (an underconfident model's NLL can be concave in u between
    T = 1 and its minimum); as u ↦ 1/T is monotone, a stationary point in u is the global minimum. The
    sigmoid-normalised NLL is not convex in 1/T and can have two local minima (seen on synthetic logits
    unlike a trained network's: large offsets, noisy labels); the fit returns the one downhill from T = 1.
    """
    _check_logits(logits, kind, labels)
    # A copy, so that logits made under torch.inference_mode (a validation pass) can be saved for backward.
    z, labels = logits.detach().double().clone(), labels.long().clone()

    def objective(log_t: Tensor) -> tuple[float, Tensor]:
        with torch.enable_grad():  # callers measure under no_grad (callbacks.measurement)
            log_t = log_t.detach().requires_grad_()
            nll = F.nll_loss(_log_probabilities(z / log_t.exp(), kind), labels)
            (grad,) = torch.autograd.grad(nll, log_t)
        return float(nll.detach()), grad

    log_t = minimise(objective, torch.zeros(1, dtype=torch.float64, device=z.device), max_iter=100, tol=1e-10)
    return float(log_t.exp())


def calibration_statistics(
    logits_holdout: Tensor,
    y_holdout: Tensor,
    logits_eval: Tensor,
    y_eval: Tensor,
    kind: ProbabilityKind = "softmax",
    num_bins: int = 15,
) -> dict[str, float]:
    """Table C.3 for one model: NLL and ECE on the evaluation set at T = 1 and at the temperature
    fitted on the hold-out set. Keys: ``nll``, ``ece``, ``nll_tempscaled``, ``ece_tempscaled``,
    ``temperature``."""
    temperature = fit_temperature(logits_holdout, y_holdout, kind)
    result = {}
    for suffix, t in (("", 1.0), ("_tempscaled", temperature)):
        result[f"nll{suffix}"] = negative_log_likelihood(logits_eval, y_eval, kind, t)
        result[f"ece{suffix}"] = expected_calibration_error(probabilities(logits_eval, kind, t), y_eval, num_bins)
    result["temperature"] = temperature
    return result


def _log_probabilities(z: Tensor, kind: str) -> Tensor:
    if kind == "softmax":
        return z.log_softmax(1)
    # log(σ(z_k) / Σ_j σ(z_j)) in log space: exact where σ underflows.
    log_sigmoid = F.logsigmoid(z)
    return log_sigmoid - log_sigmoid.logsumexp(1, keepdim=True)


def _check_logits(logits: Tensor, kind: str, labels: Tensor | None = None, temperature: float = 1.0) -> None:
    if kind not in KINDS:
        raise ValueError(f"calibration: kind must be one of {KINDS}, got {kind!r}.")
    if not temperature > 0:
        raise ValueError(f"calibration: temperature must be > 0, got {temperature}.")
    if labels is not None:
        _check_shapes("logits", logits, labels)
    elif logits.ndim != 2:
        raise ValueError(f"calibration: logits must be (N, K), got shape {tuple(logits.shape)}.")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("calibration: logits contain NaN or infinite values.")


def _check_shapes(name: str, scores: Tensor, labels: Tensor) -> None:
    if scores.ndim != 2:
        raise ValueError(f"calibration: {name} must be (N, K), got shape {tuple(scores.shape)}.")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"calibration: {scores.shape[0]} rows of {name} but labels of shape {tuple(labels.shape)}.")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"calibration: labels must be integer class indices, got {labels.dtype}.")
    if scores.shape[0] == 0:
        raise ValueError(f"calibration: {name} has no rows.")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"calibration: labels must lie in [0, {scores.shape[1]}), "
                         f"got {int(labels.min())}..{int(labels.max())}.")
