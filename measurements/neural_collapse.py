"""Neural-collapse statistics of the penultimate features and the head (Kornblith et al. 2021, Table E.2;
Papyan, Han & Donoho 2020, "Prevalence of neural collapse", NC1–NC4).

Notation. Classes c = 1..C with n_c examples (N in all), penultimate features x_i ∈ R^D, class means
μ_c, global mean μ_G = (1/C) Σ_c μ_c (the mean of the class means, Papyan's convention and the paper's
"global mean across all classes"; it makes the centred means sum to zero, so Σ_B below is the covariance
of the class means whatever the class sizes), centred means μ̃_c = μ_c − μ_G stacked as the rows of M
(C×D), head weights w_c stacked as the rows of W (C×D, bias not used).

    Σ_W = (1/N) Σ_i (x_i − μ_{y_i})(x_i − μ_{y_i})ᵀ        within-class covariance (every example weighs 1/N)
    Σ_B = (1/C) Σ_c μ̃_c μ̃_cᵀ = MᵀM / C                     covariance of the class means

Statistics (``neural_collapse_statistics`` keys; the callback logs them as ``neural_collapse/<key>``):

    std_over_avg_mean_norm    Std_c ‖μ̃_c‖ / Avg_c ‖μ̃_c‖              equinorm means (NC2)
    std_over_avg_weight_norm  Std_c ‖w_c‖ / Avg_c ‖w_c‖                equinorm weights (NC2)
    cos_mean_std              Std_{c<c'} cos(μ̃_c, μ̃_c')                equiangular means (NC2)
    cos_mean_shift_avg        Avg_{c<c'} |cos(μ̃_c, μ̃_c') + 1/(C−1)|    maximal angles (NC2)
    cos_weight_std            Std_{c<c'} cos(w_c, w_c')
    cos_weight_shift_avg      Avg_{c<c'} |cos(w_c, w_c') + 1/(C−1)|
    self_duality              ‖W/‖W‖_F − M/‖M‖_F‖²_F                   (NC3)
    within_over_between       Tr(Σ_W Σ_B⁺) / C                         within-class variability collapse (NC1)

All vanish at a simplex equiangular tight frame with the head proportional to M and no within-class
variance. Std is the sample standard deviation (Bessel-corrected, ``torch.std``'s default, as Papyan's
published code computes the norm ratios); pairs are the C(C−1)/2 unordered pairs c < c' (the ordered
pairs give the same average). A zero vector has no direction: its cosines count as 0.

Σ_B⁺ is never formed. With the thin SVD M = U S Vᵀ, Σ_B = V (S²/C) Vᵀ, so

    Tr(Σ_W Σ_B⁺) / C = Σ_j v_jᵀ Σ_W v_j / s_j²,

summed over the right singular vectors v_j kept: at most C − 1 of them (the centred means sum to zero)
and only those with s_j > rtol · s_1. A pseudo-inverse with a machine-epsilon tolerance inverts the
float32 rounding of the features wherever the class means are (nearly) rank-deficient, and reports it as
the largest term (see ``DEFAULT_RTOL``).

DDP: ``NeuralCollapseStats`` keeps sums over examples only — per-class counts and feature sums and the
total scatter Σ_i x_i x_iᵀ (one D×D matrix instead of a C×D×D per-class stack) — so ranks combine by
summation exactly, and Σ_W = (1/N)(Σ_i x_i x_iᵀ − Σ_c n_c μ_c μ_cᵀ) is recovered at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["NeuralCollapseStats", "neural_collapse_statistics"]

# Features reach us in float32 (unit roundoff 6e-8): a between-class direction whose spread is below about
# 1e-6 of the largest cannot be told from that rounding, and 1/s_j² would let it dominate the trace.
DEFAULT_RTOL = 1e-6


def neural_collapse_statistics(
    class_sums: Tensor,
    class_counts: Tensor,
    total_scatter: Tensor,
    head_weight: Tensor,
    rtol: float = DEFAULT_RTOL,
) -> dict[str, float]:
    """Table E.2 statistics (see the module docstring) from sums over examples.

    Args:
        class_sums: C×D, Σ_{i: y_i = c} x_i.
        class_counts: C, n_c; every class needs at least one example.
        total_scatter: D×D, Σ_i x_i x_iᵀ over all classes.
        head_weight: C×D, the head's weight W, row c belonging to class c.
        rtol: singular values of M at or below ``rtol`` times the largest count as zero in Σ_B⁺.
    """
    C, D = class_sums.shape
    if class_counts.shape != (C,) or total_scatter.shape != (D, D) or head_weight.shape != (C, D):
        raise ValueError(
            f"neural collapse: expected class_counts ({C},), total_scatter ({D}, {D}) and head_weight ({C}, {D}) "
            f"for class_sums {tuple(class_sums.shape)}, got {tuple(class_counts.shape)}, "
            f"{tuple(total_scatter.shape)} and {tuple(head_weight.shape)}."
        )
    if C < 3:
        raise ValueError(f"neural collapse: the pairwise statistics need at least 3 classes, got {C}.")
    counts = class_counts.double()
    if bool((counts <= 0).any()):
        missing = torch.nonzero(counts <= 0).flatten().tolist()
        raise ValueError(f"neural collapse: classes {missing[:10]} have no examples; every class needs one.")

    sums = class_sums.double()
    means = sums / counts[:, None]                                   # μ_c
    M = means - means.mean(0)                                        # μ̃_c = μ_c − μ_G
    W = head_weight.detach().to(device=M.device, dtype=torch.float64)

    _, s, Vh = torch.linalg.svd(M, full_matrices=False)
    # s is sorted; rank(M) ≤ C − 1 exactly (the rows sum to zero), whatever rounding leaves in s_C.
    rank = min(C - 1, int((s > rtol * s[0]).sum()))
    s, V = s[:rank], Vh[:rank].T                                     # V: D×rank
    # v_jᵀ Σ_W v_j = (1/N)(v_jᵀ (Σ_i x_i x_iᵀ) v_j − Σ_c n_c (μ_cᵀ v_j)²): Σ_W itself is never formed.
    within = ((total_scatter.double() @ V) * V).sum(0) - (counts[:, None] * (means @ V) ** 2).sum(0)
    within_over_between = (within / counts.sum() / s**2).sum()

    return {
        "std_over_avg_mean_norm": _std_over_avg_norm(M),
        "std_over_avg_weight_norm": _std_over_avg_norm(W),
        **{f"cos_mean_{k}": v for k, v in _pairwise_cosines(M).items()},
        **{f"cos_weight_{k}": v for k, v in _pairwise_cosines(W).items()},
        "self_duality": float((W / W.norm() - M / M.norm()).pow(2).sum()),
        "within_over_between": float(within_over_between),
    }


def _std_over_avg_norm(rows: Tensor) -> float:
    norms = rows.norm(dim=1)
    return float(norms.std() / norms.mean())


def _pairwise_cosines(rows: Tensor) -> dict[str, float]:
    """Std of cos over the pairs c < c', and Avg of |cos + 1/(C−1)| (0 at a simplex ETF)."""
    C = rows.shape[0]
    unit = F.normalize(rows, dim=1)
    i, j = torch.triu_indices(C, C, offset=1, device=rows.device)
    cos = (unit @ unit.T)[i, j]  # from the C×C Gram matrix: never a (pairs × D) tensor
    return {"std": float(cos.std()), "shift_avg": float((cos + 1.0 / (C - 1)).abs().mean())}


class NeuralCollapseStats(Metric):
    """Sums over examples for ``neural_collapse_statistics``, accumulated over batches and DDP ranks.

    States (float64, summed across ranks): ``class_counts`` (C), ``class_sums`` (C×D) and
    ``total_scatter`` (D×D, Σ_i x_i x_iᵀ): 8·(C + C·D + D²) bytes, 48 MiB for C = 1000, D = 2048.

    Float64 keeps Σ_W = (Σ x xᵀ − Σ n_c μ_c μ_cᵀ)/N exact to well below the float32 resolution of the
    features unless ‖μ_G‖² exceeds the within-class variance by ~1e9.

    Usage: ``update(features, labels)`` per batch, then
    ``neural_collapse_statistics(*metric.sufficient_statistics(), head.weight)``.
    """

    full_state_update = False

    def __init__(self, num_classes: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.dim = num_classes, dim
        f64 = torch.float64
        self.add_state("class_counts", torch.zeros(num_classes, dtype=f64), dist_reduce_fx="sum")
        self.add_state("class_sums", torch.zeros(num_classes, dim, dtype=f64), dist_reduce_fx="sum")
        self.add_state("total_scatter", torch.zeros(dim, dim, dtype=f64), dist_reduce_fx="sum")

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch: ``features`` N×D (penultimate, any float dtype), ``labels`` N integers in [0, C)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"neural collapse: features must be (N, {self.dim}), got {tuple(features.shape)}.")
        if labels.shape != (features.shape[0],):
            raise ValueError(f"neural collapse: {features.shape[0]} feature rows but labels of shape {tuple(labels.shape)}.")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"neural collapse: labels must lie in [0, {self.num_classes}), "
                             f"got {int(labels.min())}..{int(labels.max())}.")
        x = features.detach().double()
        self.class_counts += torch.bincount(labels, minlength=self.num_classes).double()
        self.class_sums.index_add_(0, labels, x)
        self.total_scatter += x.T @ x

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.class_sums, self.class_counts, self.total_scatter

    def sufficient_statistics(self) -> tuple[Tensor, Tensor, Tensor]:
        """(class_sums, class_counts, total_scatter) summed over every rank: the first arguments of
        ``neural_collapse_statistics``. Goes through ``compute`` so torchmetrics syncs the ranks."""
        return self.compute()
