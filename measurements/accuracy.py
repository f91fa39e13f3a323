"""A data set's accuracy measure (Kornblith et al. 2021, Table A.2): ``"top1"``, the fraction of examples
classified correctly, or ``"mean_per_class"``, the mean over the classes present of each class's recall (correct
in class c / examples of class c), which the authors of Oxford-IIIT Pets and Oxford 102 Flowers ask for.

Both are functions of per-class sums (correct_c, count_c), so one formula (``score_from_counts``) serves whole
prediction tensors (``score``: the probes) and sums accumulated over batches and processes (``MeasuredAccuracy``:
validation of a fine-tuning run, exact under DDP).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["MEASURES", "MeasuredAccuracy", "check_measure", "score", "score_from_counts"]

MEASURES = ("top1", "mean_per_class")


def check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; expected one of {MEASURES} (mean_per_class for Pets and Flowers, "
                         f"top1 for the other data sets of Table A.2).")
    return measure


def score_from_counts(correct: Tensor, count: Tensor, measure: str) -> float:
    """The measure from per-class sums: ``correct[c]`` examples of class c classified correctly of ``count[c]``.
    top1 = Σ correct / Σ count; mean_per_class = mean over classes with count > 0 of correct / count."""
    check_measure(measure)
    correct, count = correct.double(), count.double()
    if measure == "top1":
        return float(correct.sum() / count.sum())
    present = count > 0
    return float((correct[present] / count[present]).mean())


def score(logits_or_predictions: Tensor, labels: Tensor, measure: str = "top1") -> float:
    """The data set's measure of predictions (N) or logits/scores (N × C, predicted class = argmax)."""
    check_measure(measure)
    predictions = logits_or_predictions.argmax(1) if logits_or_predictions.ndim == 2 else logits_or_predictions
    if predictions.shape != labels.shape or labels.ndim != 1 or labels.numel() == 0:
        raise ValueError(f"score: {tuple(predictions.shape)} predictions for {tuple(labels.shape)} labels.")
    correct = (predictions == labels).double()
    return score_from_counts(torch.bincount(labels, weights=correct), torch.bincount(labels), measure)


class MeasuredAccuracy(Metric):
    """``measure`` of logits against labels, accumulated as per-class sums over batches and processes (summed
    across ranks, so exact when ranks hold different numbers of examples)."""

    full_state_update = False

    def __init__(self, num_classes: int, measure: str):
        super().__init__()
        self.measure = check_measure(measure)
        self.num_classes = num_classes
        self.add_state("correct", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        hit = (logits.argmax(1) == labels).double()
        self.correct += torch.bincount(labels, weights=hit, minlength=self.num_classes)
        self.count += torch.bincount(labels, minlength=self.num_classes).double()

    def compute(self) -> Tensor:
        return torch.tensor(score_from_counts(self.correct, self.count, self.measure), dtype=torch.float64)
