"""Linear CKA between the layers of two networks (Kornblith et al. 2021, Eq. 10; Figure 2).

CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) with K = X Xᵀ and L = Y Yᵀ the linear-kernel Gram
matrices of two layers' activations on the same n examples (each example flattened over channels and
space). HSIC is the unbiased estimator of Song et al. (2012), as in Nguyen et al.'s (2021) minibatch CKA:
with K̃, L̃ the Gram matrices with their diagonals set to zero,

    HSIC₁(K, L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3)).

Minibatch CKA sums HSIC₁ over minibatches, each with its own 1/(n(n−3)) factor, and reports
Σ HSIC₁(K, L) / sqrt(Σ HSIC₁(K, K) · Σ HSIC₁(L, L)): a ratio of sums, never the mean of per-batch CKA.
Only Gram matrices (n×n per layer) are needed, so a forward hook can reduce each block's output as it is
produced and memory is bounded by one batch, whatever the layers' widths. Everything is float64: the Gram
products of ReLU features are large, positive and nearly cancel in HSIC, and float32 loses the difference.

For full data with width below n, ``feature_space_cka`` gives the biased linear CKA of Kornblith et al.
(2019) as ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on centred features, without an n×n matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["gram", "unbiased_hsic", "linear_cka", "feature_space_cka", "MinibatchCKA"]


def gram(features: Tensor) -> Tensor:
    """Linear-kernel Gram matrix X Xᵀ (n×n, float64) of ``features`` (n × ...), flattened per example."""
    x = features.reshape(features.shape[0], -1).double()
    return x @ x.T


def _check_batch_size(n: int) -> None:
    if n <= 3:
        raise ValueError(f"unbiased HSIC needs more than 3 examples per batch, got n = {n}: the estimator divides "
                         "by n(n−3) (and by n−2). Use larger batches (the paper uses 1,500).")


def _zero_diagonal(grams: Tensor) -> Tensor:
    """A copy of the Gram matrix (n×n) or stack of them (…×n×n) with each diagonal set to zero.

    The diagonal of the matrix, not ``K − diag(K)`` with a vector: that broadcasts to K_ij − K_jj, a bug
    that makes HSIC negative and CKA NaN in public code.
    """
    zeroed = grams.clone()
    zeroed.diagonal(dim1=-2, dim2=-1).zero_()
    return zeroed


def _hsic(trace: Tensor, row_products: Tensor, total_k: Tensor, total_l: Tensor, n: int) -> Tensor:
    """HSIC₁ from tr(K̃L̃), 1ᵀK̃L̃1, 1ᵀK̃1 and 1ᵀL̃1 (broadcasting): the module docstring's formula."""
    return (trace + total_k * total_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * row_products) / (n * (n - 3))


def unbiased_hsic(K: Tensor, L: Tensor) -> Tensor:
    """Unbiased HSIC₁ (Song et al. 2012) of two n×n Gram matrices of the same examples, as a float64 scalar.

    Gram matrices are symmetric, so tr(K̃L̃) = Σ_ij K̃_ij L̃_ij and 1ᵀK̃L̃1 = (K̃1)·(L̃1).
    """
    n = K.shape[0]
    if K.shape != (n, n) or L.shape != (n, n):
        raise ValueError(f"unbiased HSIC takes two n×n Gram matrices of the same examples, got {tuple(K.shape)} "
                         f"and {tuple(L.shape)}.")
    _check_batch_size(n)
    k, l = _zero_diagonal(K.double()), _zero_diagonal(L.double())
    rows_k, rows_l = k.sum(1), l.sum(1)
    return _hsic((k * l).sum(), rows_k @ rows_l, rows_k.sum(), rows_l.sum(), n)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Full-data linear CKA of activations ``x`` and ``y`` (n × ..., the same examples) with unbiased HSIC₁."""
    K, L = gram(x), gram(y)
    return float(unbiased_hsic(K, L) / (unbiased_hsic(K, K) * unbiased_hsic(L, L)).sqrt())


def feature_space_cka(x: Tensor, y: Tensor) -> float:
    """Biased full-data linear CKA (Kornblith et al. 2019) in feature space: ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) with
    X, Y centred over the examples. Equals the biased HSIC form tr(HKH·HLH) / ... with H the centring matrix,
    at O(n·p²) instead of O(n²·p): the cheaper form when the widths p are below n."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    x, y = x - x.mean(0), y - y.mean(0)
    return float((y.T @ x).square().sum() / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


class _GramTerms:
    """Per-layer pieces of HSIC₁ from a stack of Gram matrices (layers × n × n), each computed once: the
    zero-diagonal Grams flattened (layers × n²), their row sums K̃1 (layers × n) and totals 1ᵀK̃1 (layers)."""

    def __init__(self, grams: Tensor):
        zeroed = _zero_diagonal(grams.double())
        self.n = grams.shape[-1]
        self.flat = zeroed.flatten(1)
        self.rows = zeroed.sum(-1)
        self.totals = self.rows.sum(-1)

    def cross(self, other: _GramTerms) -> Tensor:
        """HSIC₁ of every pair (self's layer i, other's layer j): one matmul for the traces, one for 1ᵀK̃L̃1."""
        return _hsic(self.flat @ other.flat.T, self.rows @ other.rows.T,
                     self.totals[:, None], other.totals[None, :], self.n)

    def self_hsic(self) -> Tensor:
        """HSIC₁(K, K) of each layer."""
        return _hsic(self.flat.square().sum(1), self.rows.square().sum(1), self.totals, self.totals, self.n)


class MinibatchCKA(Metric):
    """Block×block minibatch linear CKA between network A's ``num_layers_a`` layers and network B's
    ``num_layers_b`` (Nguyen et al. 2021; Kornblith et al. 2021, Figure 2).

    ``update`` takes one batch's Gram matrices, ``grams_a`` (A × n × n) and ``grams_b`` (B × n × n), of the
    same n > 3 examples (``gram`` of each layer's output, computed in the forward hook so activations are
    never held). Every pair's HSIC₁ comes from the A + B Gram matrices: no Gram is recomputed per pair. For
    one network against itself pass ``grams_b=None`` (then A = B and the self-terms are shared).

    States are float64 sums summed across DDP ranks, so ``compute`` gives the single-process value: Σ HSIC₁(K_a,
    L_b) (A × B), Σ HSIC₁(K_a, K_a) (A) and Σ HSIC₁(L_b, L_b) (B). Each batch's HSIC₁ carries its own
    1/(n(n−3)), so an unequal last batch is weighted as the estimator requires.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_layers_a: int, num_layers_b: int, **kwargs):
        super().__init__(**kwargs)
        f64 = torch.float64
        self.num_layers_a, self.num_layers_b = num_layers_a, num_layers_b
        self.add_state("hsic_ab", torch.zeros(num_layers_a, num_layers_b, dtype=f64), dist_reduce_fx="sum")
        self.add_state("hsic_aa", torch.zeros(num_layers_a, dtype=f64), dist_reduce_fx="sum")
        self.add_state("hsic_bb", torch.zeros(num_layers_b, dtype=f64), dist_reduce_fx="sum")

    def update(self, grams_a: Tensor, grams_b: Tensor | None = None) -> None:
        self._check(grams_a, self.num_layers_a, "grams_a")
        a = _GramTerms(grams_a)
        if grams_b is None:
            if self.num_layers_a != self.num_layers_b:
                raise ValueError("MinibatchCKA: grams_b=None compares network A with itself, which needs "
                                 f"num_layers_a == num_layers_b, got {self.num_layers_a} and {self.num_layers_b}.")
            b = a
        else:
            self._check(grams_b, self.num_layers_b, "grams_b")
            if grams_b.shape[-1] != a.n:
                raise ValueError(f"MinibatchCKA: grams_a are of {a.n} examples but grams_b of {grams_b.shape[-1]}; "
                                 "both networks must see the same batch.")
            b = _GramTerms(grams_b)
        self_a = a.self_hsic()
        self_b = self_a if grams_b is None else b.self_hsic()
        self.hsic_ab += a.cross(b)
        self.hsic_aa += self_a
        self.hsic_bb += self_b

    @staticmethod
    def _check(grams: Tensor, layers: int, name: str) -> None:
        if grams.ndim != 3 or grams.shape[0] != layers or grams.shape[1] != grams.shape[2]:
            raise ValueError(f"MinibatchCKA: {name} must be ({layers}, n, n) Gram matrices, got {tuple(grams.shape)}.")
        _check_batch_size(grams.shape[-1])

    def compute(self) -> Tensor:
        """The A × B float64 CKA matrix: ratio of the summed HSIC₁ terms (torchmetrics returns a 1 × 1 result as a
        scalar)."""
        return self.hsic_ab / torch.outer(self.hsic_aa, self.hsic_bb).sqrt()
