"""Prediction agreement between two models on the same examples (Kornblith et al. 2021, Figure C.4).

Over N examples with labels y and the two models' predicted classes a and b:

- ``agreement``: fraction with a = b;
- ``both_right_or_both_wrong``: fraction with (a = y) = (b = y);
- ``both_wrong``: fraction with a ≠ y and b ≠ y;
- ``shared_wrong``: among the examples both get wrong, the fraction with a = b (the figure's quantity: do
  the models make the same mistakes?). NaN when no example is wrong for both: there is nothing to measure,
  and a NaN says so where 0 or 1 would pass for a result;
- ``both_right``, ``a_right_alone`` (a = y ≠ b), ``b_right_alone`` (b = y ≠ a) and ``both_wrong``: where each
  model errs (Neyshabur et al. 2020, Figure 4: P-T and RI-T models err on different images), which split the
  examples and sum to 1.

All are ratios of counts, so the function and the streaming ``PredictionAgreement`` share one
reduction, and summing the counts over batches and DDP ranks gives the single-pass value exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["prediction_agreement", "PredictionAgreement"]

_COUNTS = ("examples", "same", "right_a", "both_right", "both_wrong", "same_when_both_wrong")


def _predicted_classes(predictions: Tensor) -> Tensor:
    """Class indices from class indices (N) or from scores (N × C: the arg-max)."""
    return predictions.argmax(1) if predictions.ndim == 2 else predictions


def _agreement_counts(predictions_a: Tensor, predictions_b: Tensor, labels: Tensor) -> dict[str, Tensor]:
    a, b = _predicted_classes(predictions_a), _predicted_classes(predictions_b)
    if not (a.shape == b.shape == labels.shape) or labels.ndim != 1:
        raise ValueError(f"prediction agreement: predictions {tuple(predictions_a.shape)} and "
                         f"{tuple(predictions_b.shape)} do not match labels {tuple(labels.shape)}.")
    same, right_a, right_b = a == b, a == labels, b == labels
    both_wrong = ~right_a & ~right_b
    return {"examples": torch.tensor(labels.numel(), device=labels.device), "same": same.sum(), "right_a": right_a.sum(),
            "both_right": (right_a & right_b).sum(), "both_wrong": both_wrong.sum(),
            "same_when_both_wrong": (same & both_wrong).sum()}


def _agreement_from_counts(counts: dict[str, Tensor]) -> dict[str, float]:
    n, both_right, both_wrong = int(counts["examples"]), int(counts["both_right"]), int(counts["both_wrong"])
    if n == 0:
        raise ValueError("prediction agreement: no examples.")
    a_alone = int(counts["right_a"]) - both_right
    return {
        "agreement": int(counts["same"]) / n,
        "both_right_or_both_wrong": (both_right + both_wrong) / n,
        "both_wrong": both_wrong / n,
        "shared_wrong": int(counts["same_when_both_wrong"]) / both_wrong if both_wrong else float("nan"),
        "both_right": both_right / n,
        "a_right_alone": a_alone / n,
        "b_right_alone": (n - both_right - both_wrong - a_alone) / n,  # the rest: the four cases split the examples
    }


def prediction_agreement(predictions_a: Tensor, predictions_b: Tensor, labels: Tensor) -> dict[str, float]:
    """Agreement statistics of two models' predictions (class indices N, or scores N × C) against ``labels``
    (N); see the module docstring. ``shared_wrong`` is NaN when no example is wrong for both models."""
    return _agreement_from_counts(_agreement_counts(predictions_a, predictions_b, labels))


class PredictionAgreement(Metric):
    """``prediction_agreement`` over batches: integer counts summed over updates and DDP ranks."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in _COUNTS:
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions_a: Tensor, predictions_b: Tensor, labels: Tensor) -> None:
        for name, count in _agreement_counts(predictions_a, predictions_b, labels).items():
            setattr(self, name, getattr(self, name) + count)

    def compute(self) -> dict[str, float]:
        return _agreement_from_counts({name: getattr(self, name) for name in _COUNTS})
