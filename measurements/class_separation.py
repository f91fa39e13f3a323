"""Class separation R² (Kornblith et al. 2021, Eq. 11), in closed form.

With embeddings L2-normalised to u_i and class means μ_k = mean of u_i over class k (K classes present):

    d_within = 1 − (1/K) Σ_k ‖μ_k‖²,    d_total = 1 − ‖(1/K) Σ_k μ_k‖²,    R² = 1 − d_within / d_total.

This equals the pairwise double sums of Eq. 11 (self-pairs included), since Σ_{m,n∈k} u_mᵀu_n = ‖N_k μ_k‖²,
and costs O(N·P) with only the per-class sums of u kept: never an N×N matrix. R² needs only the two
numbers Σ_k ‖μ_k‖² and ‖Σ_k μ_k‖²: ``ClassSeparation`` reads examples class by class and keeps one class's
sum, Σ_k μ_k and Σ_k ‖μ_k‖², O(P) memory (a ResNet-50 block at 56×56×256 is 0.8 M floats; K per-class sums
of every block would be ~22 GB at 1,000 classes).

Self-pairs bias R² measured on n examples per class upwards by about (1 − R²)/n: E‖μ̂_k‖² = ‖μ_k‖² +
(1 − ‖μ_k‖²)/n for unit vectors. At 50 per class that is +0.013 for softmax's penultimate R² of 0.35, far
above the paper's ±0.0002 between seeds; hence the whole training set for the penultimate layer. Conv maps are flattened
over channels and space per example (Figure 4). An all-zero embedding has no direction; it normalises to
the zero vector (it then counts as cosine similarity 0 with everything).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["class_separation", "class_separation_from_sums", "ClassSeparation"]


def class_separation_from_sums(class_sums: Tensor, class_counts: Tensor) -> float:
    """R² from per-class sums of normalised embeddings (K×P) and per-class counts (K); empty classes are ignored."""
    present = class_counts > 0
    if int(present.sum()) < 2:
        raise ValueError(f"class separation needs examples of at least 2 classes, got {int(present.sum())}.")
    means = class_sums[present].double() / class_counts[present].double().unsqueeze(1)  # μ_k
    d_within = 1.0 - means.pow(2).sum(1).mean()
    d_total = 1.0 - means.mean(0).pow(2).sum()
    return float(1.0 - d_within / d_total)


def _normalised_class_sums(features: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"class separation: {features.shape[0]} embeddings but {labels.shape[0]} labels.")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"class separation: labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}.")
    u = torch.nn.functional.normalize(features.flatten(1).float(), dim=1)
    sums = torch.zeros(num_classes, u.shape[1], dtype=torch.float32, device=u.device).index_add_(0, labels, u)
    counts = torch.bincount(labels, minlength=num_classes)
    return sums, counts


def class_separation(features: Tensor, labels: Tensor, num_classes: int | None = None) -> float:
    """R² of ``features`` (N × ... , flattened per example) grouped by integer ``labels`` (N)."""
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    return class_separation_from_sums(*_normalised_class_sums(features, labels, num_classes))


class ClassSeparation(Metric):
    """R² of embeddings that arrive class by class: every example of a class in consecutive updates on one
    process (classes dealt to processes whole). Keeps the open class's sum of u, and Σ_k μ_k and Σ_k ‖μ_k‖²
    (float64) over the closed ones; under DDP those sums, and the number of classes, are summed across
    ranks, so the result is the single-process value. A class that comes back after another began is an
    error: its mean would be split in two.
    """

    full_state_update = False

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        f64 = torch.float64
        self.add_state("sum_of_mean_norms", torch.zeros((), dtype=f64), dist_reduce_fx="sum")  # Σ_k ‖μ_k‖²
        self.add_state("sum_of_means", torch.zeros(dim, dtype=f64), dist_reduce_fx="sum")  # Σ_k μ_k
        self.add_state("classes", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self._open: tuple[int, Tensor, int] | None = None  # (label, Σ u, count) of the class being read
        self._closed: set[int] = set()

    def update(self, features: Tensor, labels: Tensor) -> None:
        if features.shape[0] != labels.shape[0]:
            raise ValueError(f"class separation: {features.shape[0]} embeddings but {labels.shape[0]} labels.")
        u = torch.nn.functional.normalize(features.flatten(1).float(), dim=1)
        starts = [0, *(torch.nonzero(labels[1:] != labels[:-1]).flatten() + 1).tolist(), len(labels)]
        for begin, end in zip(starts[:-1], starts[1:]):
            label = int(labels[begin])
            if self._open is None or self._open[0] != label:
                self._close()
                if label in self._closed:
                    raise ValueError(f"class separation: class {label} came back after other classes; "
                                     "examples must arrive class by class.")
                self._open = (label, torch.zeros(u.shape[1], dtype=torch.float64, device=u.device), 0)
            label, total, count = self._open
            self._open = (label, total + u[begin:end].sum(0, dtype=torch.float64), count + end - begin)

    def _close(self) -> None:
        if self._open is not None:
            label, total, count = self._open
            mean = total / count
            self.sum_of_mean_norms += mean.dot(mean)
            self.sum_of_means += mean
            self.classes += 1
            self._closed.add(label)
            self._open = None

    def sync(self, *args, **kwargs) -> None:
        self._close()  # the last class read is complete once the pass is
        super().sync(*args, **kwargs)

    def compute(self) -> Tensor:
        k = int(self.classes)
        if k < 2:
            raise ValueError(f"class separation needs examples of at least 2 classes, got {k}.")
        d_within = 1.0 - self.sum_of_mean_norms / k
        d_total = 1.0 - (self.sum_of_means / k).pow(2).sum()
        return 1.0 - d_within / d_total

    def reset(self) -> None:
        super().reset()
        self._open, self._closed = None, set()
