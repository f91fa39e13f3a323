"""Neural-collapse statistics (Table E.2; Papyan et al. 2020) against the textbook formulas written out,
on unequal classes, rank-deficient class means, an exact simplex ETF, and split (DDP-style) accumulation."""

import itertools
import math

import numpy as np
import pytest
import torch

from measurements.neural_collapse import NeuralCollapseStats, neural_collapse_statistics

KEYS = {"std_over_avg_mean_norm", "std_over_avg_weight_norm", "cos_mean_std", "cos_mean_shift_avg",
        "cos_weight_std", "cos_weight_shift_avg", "self_duality", "within_over_between"}


def reference(x: torch.Tensor, y: torch.Tensor, W: torch.Tensor, rank: int) -> dict[str, float]:
    """Every statistic by its definition, with Σ_B⁺ the pseudo-inverse of Σ_B truncated to ``rank``."""
    x, W = x.double().numpy(), W.double().numpy()
    y = y.numpy()
    C, N = W.shape[0], len(y)
    mu = np.stack([x[y == c].mean(0) for c in range(C)])
    mu_tilde = mu - mu.mean(0)  # global mean = mean of the class means
    sigma_w = sum(np.outer(x[i] - mu[y[i]], x[i] - mu[y[i]]) for i in range(N)) / N
    sigma_b = sum(np.outer(mu_tilde[c], mu_tilde[c]) for c in range(C)) / C
    eigval, eigvec = np.linalg.eigh(sigma_b)  # ascending
    top = eigvec[:, -rank:]
    sigma_b_truncated = torch.from_numpy(top @ np.diag(eigval[-rank:]) @ top.T)
    sigma_b_pinv = torch.linalg.pinv(sigma_b_truncated, hermitian=True).numpy()

    def cos(a, b):
        return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))

    def norm_ratio(rows):
        norms = [np.linalg.norm(r) for r in rows]
        return np.std(norms, ddof=1) / np.mean(norms)

    def cosine_stats(rows):
        pairs = [cos(rows[c], rows[d]) for c, d in itertools.combinations(range(C), 2)]
        return np.std(pairs, ddof=1), np.mean([abs(p + 1 / (C - 1)) for p in pairs])

    cos_mean_std, cos_mean_shift = cosine_stats(mu_tilde)
    cos_weight_std, cos_weight_shift = cosine_stats(W)
    return {
        "std_over_avg_mean_norm": norm_ratio(mu_tilde),
        "std_over_avg_weight_norm": norm_ratio(W),
        "cos_mean_std": cos_mean_std,
        "cos_mean_shift_avg": cos_mean_shift,
        "cos_weight_std": cos_weight_std,
        "cos_weight_shift_avg": cos_weight_shift,
        "self_duality": np.sum((W / np.linalg.norm(W) - mu_tilde / np.linalg.norm(mu_tilde)) ** 2),
        "within_over_between": np.trace(sigma_w @ sigma_b_pinv) / C,
    }


def accumulate(x, y, num_classes, batch=7) -> NeuralCollapseStats:
    metric = NeuralCollapseStats(num_classes, x.shape[1])
    for rows in torch.arange(len(y)).split(batch):
        metric.update(x[rows], y[rows])
    return metric


def statistics(x, y, W, **kwargs) -> dict[str, float]:
    return neural_collapse_statistics(*accumulate(x, y, W.shape[0]).sufficient_statistics(), W, **kwargs)


def clustered(sizes, dim, seed=0, offset=3.0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    centres = torch.randn(len(sizes), dim, generator=g) + offset
    x = centres[y] + 0.8 * torch.randn(len(y), dim, generator=g)
    W = torch.randn(len(sizes), dim, generator=g)
    return x, y, W


def assert_matches(ours: dict, ref: dict, rel=1e-9, abs=1e-12):
    assert set(ours) == KEYS
    for key in KEYS:
        assert ours[key] == pytest.approx(ref[key], rel=rel, abs=abs), key


@pytest.mark.parametrize("sizes, dim", [([4, 9, 2, 13, 6], 8), ([3, 1, 7, 5, 2, 4], 3)], ids=["D>C", "D<C"])
def test_every_statistic_matches_its_definition_on_unequal_classes(sizes, dim):
    x, y, W = clustered(sizes, dim)
    rank = min(dim, len(sizes) - 1)  # centred means span at most C − 1 directions
    assert_matches(statistics(x, y, W), reference(x, y, W, rank))


def test_means_in_a_subspace_match_the_truncated_pinv_where_the_default_one_inverts_rounding():
    """Class means in a 2-dim subspace of R^6 up to float32 rounding of the features; the within-class
    spread is isotropic (zero per-class mean, so the class means stay in the subspace)."""
    C, D, k, per_class = 5, 6, 2, 4
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))[0]
    means = torch.randn(C, k, generator=g, dtype=torch.float64) @ basis.T + 10.0
    noise = torch.randn(C, per_class, D, generator=g, dtype=torch.float64)
    noise -= noise.mean(1, keepdim=True)
    x = (means[:, None] + noise).reshape(-1, D).float()  # the network hands over float32
    y = torch.arange(C).repeat_interleave(per_class)
    W = torch.randn(C, D, generator=g)

    ref = reference(x, y, W, rank=k)
    assert_matches(statistics(x, y, W), ref, rel=1e-6)

    # The naive route: default-tolerance pinv of the full Σ_B inverts the rounding directions.
    xd = x.double()
    mu = torch.stack([xd[y == c].mean(0) for c in range(C)])
    M = mu - mu.mean(0)
    sigma_w = sum(torch.outer(v, v) for v in xd - mu[y]) / len(y)
    naive = torch.trace(sigma_w @ torch.linalg.pinv(M.T @ M / C, hermitian=True)) / C
    assert naive > 1e3 * ref["within_over_between"]


def simplex_etf(C: int, D: int, seed=0) -> torch.Tensor:
    """C rows in R^D with equal norms and pairwise cosines −1/(C−1), centred: an orthonormal embedding of
    the rows of I − 11ᵀ/C, scaled."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D, C, generator=g, dtype=torch.float64))[0]  # D×C orthonormal columns
    return 2.5 * (torch.eye(C, dtype=torch.float64) - 1.0 / C) @ U.T


def test_simplex_etf_with_no_within_class_variance_hits_every_limit():
    C, D = 5, 8
    etf = simplex_etf(C, D)
    offset = torch.linspace(-1, 2, D, dtype=torch.float64)  # the global mean is subtracted away
    sizes = torch.tensor([3, 1, 4, 2, 6])
    y = torch.arange(C).repeat_interleave(sizes)
    x = etf[y] + offset
    stats = statistics(x, y, 0.3 * etf)  # W ∝ M
    for key in KEYS:
        assert stats[key] == pytest.approx(0.0, abs=1e-10), key


def test_within_over_between_at_a_simplex_etf_with_isotropic_spread():
    """Σ_W = σ² I exactly (each class: μ_c ± σ√D e_d); Σ_B has the eigenvalue r²/(C−1) C−1 times, with r
    the norm of the centred means, so Tr(Σ_W Σ_B⁺)/C = σ² (C−1)² / (C r²)."""
    C, D, sigma = 4, 6, 0.3
    etf = simplex_etf(C, D, seed=1)
    r = float(etf[0].norm())
    spikes = sigma * math.sqrt(D) * torch.cat([torch.eye(D), -torch.eye(D)]).double()  # 2D rows
    x = (etf[:, None] + spikes).reshape(-1, D)
    y = torch.arange(C).repeat_interleave(2 * D)
    stats = statistics(x, y, etf)
    assert stats["within_over_between"] == pytest.approx(sigma**2 * (C - 1) ** 2 / (C * r**2), rel=1e-10)
    assert stats["cos_mean_shift_avg"] == pytest.approx(0.0, abs=1e-12)


def test_two_halves_merged_equal_one_pass_over_everything():
    x, y, W = clustered([6, 11, 4, 9], dim=5, seed=2)
    whole = accumulate(x, y, 4)
    first, second = accumulate(x[:13], y[:13], 4), accumulate(x[13:], y[13:], 4)
    first.merge_state(second)  # dist_reduce_fx="sum": what DDP's sync does across ranks
    for ours, theirs in zip(first.sufficient_statistics(), whole.sufficient_statistics()):
        torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=1e-12)
    merged = neural_collapse_statistics(*first.sufficient_statistics(), W)
    assert_matches(merged, neural_collapse_statistics(*whole.sufficient_statistics(), W), rel=1e-10)


def test_states_are_float64_sums():
    metric = NeuralCollapseStats(3, 2)
    metric.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([2, 2]))
    sums, counts, scatter = metric.sufficient_statistics()
    assert {sums.dtype, counts.dtype, scatter.dtype} == {torch.float64}
    assert counts.tolist() == [0, 0, 2]
    assert sums[2].tolist() == [4.0, 6.0]
    assert scatter.tolist() == [[10.0, 14.0], [14.0, 20.0]]


@pytest.mark.parametrize("features, labels, match", [
    (torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), "labels must lie in"),
    (torch.zeros(4, 3), torch.tensor([0, 1, 2, -1]), "labels must lie in"),
    (torch.zeros(4, 5), torch.tensor([0, 1, 2, 0]), r"features must be \(N, 3\)"),
    (torch.zeros(4, 3), torch.tensor([0, 1, 2]), "labels of shape"),
])
def test_update_rejects_bad_input(features, labels, match):
    with pytest.raises(ValueError, match=match):
        NeuralCollapseStats(3, 3).update(features, labels)


def test_statistics_reject_an_empty_class_and_a_misaligned_head():
    x, y, W = clustered([3, 4, 5], dim=4)
    sums, counts, scatter = accumulate(x, y, 4).sufficient_statistics()  # class 3 never seen
    with pytest.raises(ValueError, match=r"classes \[3\] have no examples"):
        neural_collapse_statistics(sums, counts, scatter, torch.randn(4, 4))
    sums, counts, scatter = accumulate(x, y, 3).sufficient_statistics()
    with pytest.raises(ValueError, match="head_weight"):
        neural_collapse_statistics(sums, counts, scatter, W.T)
