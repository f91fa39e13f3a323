"""Class separation R² (Kornblith et al. 2021, Eq. 11), in closed form.

With embeddings L2-normalised to u_i and class means μ_k = mean of u_i over class k (K classes present):

    d_within = 1 − (1/K) Σ_k ‖μ_k‖²,    d_total = 1 − ‖(1/K) Σ_k μ_k‖²,    R² = 1 − d_within / d_total.

This equals the pairwise double sums of Eq. 11 (self-pairs included), since Σ_{m,n∈k} u_mᵀu_n = ‖N_k μ_k‖²,
and costs O(N·P) with only the per-class sums of u kept: never an N×N matrix. Conv maps are flattened
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
    """R² accumulated over batches and, under DDP, over ranks: per-class sums of u and counts are summed,
    so the result equals the single-process value exactly (up to float32 summation order).

    Memory is K × P floats (P: the flattened embedding size), allocated on the first update.
    """

    full_state_update = False

    def __init__(self, num_classes: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("class_sums", torch.zeros(num_classes, dim), dist_reduce_fx="sum")
        self.add_state("class_counts", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, features: Tensor, labels: Tensor) -> None:
        sums, counts = _normalised_class_sums(features, labels, self.num_classes)
        self.class_sums += sums
        self.class_counts += counts

    def compute(self) -> Tensor:
        return torch.tensor(class_separation_from_sums(self.class_sums, self.class_counts))
