"""ReLU sparsity (Kornblith et al. 2021, Figure 3): the fraction of non-zero activations.

Measured on each block's output (after the residual add and its ReLU) and on the pooled penultimate
features. Only counts are kept, so a forward hook can reduce a block's output as soon as it exists.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["relu_nonzero_fraction", "NonzeroFraction"]


def relu_nonzero_fraction(activations: Tensor) -> float:
    """Fraction of entries of ``activations`` that are not exactly zero."""
    return float(torch.count_nonzero(activations)) / activations.numel()


class NonzeroFraction(Metric):
    """Non-zero fraction over every entry seen, summed over batches and DDP ranks (exact)."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("nonzero", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, activations: Tensor) -> None:
        self.nonzero += torch.count_nonzero(activations)
        self.total += activations.numel()

    def compute(self) -> Tensor:
        return self.nonzero.double() / self.total
