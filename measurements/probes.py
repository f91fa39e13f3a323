"""Transfer probes on frozen features (Kornblith et al. 2021, appendix A.2 and Table 1): a linear probe
(L2-regularised multinomial logistic regression) and a k-nearest-neighbour probe.

Both take feature tensors (N × D, on any device) with integer labels and return the test score in the
data set's measure (``measurements/accuracy.py``): ``"top1"`` accuracy, or ``"mean_per_class"`` accuracy (the
mean over the classes present of each class's recall) for the sets whose authors ask for it (Pets, Flowers).
Scores are fractions in [0, 1].

**Linear probe** (appendix A.2). Weights W (D × C) and bias b minimise, over the N training examples,

    L(W, b) = Σ_i CE(softmax(x_i W + b), y_i) + (λ/2)·‖W‖²_F          (the bias is not regularised)

i.e. λ applies to the *sum* of per-example losses, as in the paper. scikit-learn's
``LogisticRegression(C=...)`` minimises C·Σ_i CE + ½‖W‖², the same problem with λ = 1/C. The optimiser
is full-batch L-BFGS (``measurements.lbfgs``, shared with temperature scaling) on L/N, stopping when
max |∇(L/N)| ≤ ``tol``: the same objective scaling and stopping rule as scikit-learn's ``lbfgs`` solver
with ``tol``, so tolerances compare one for one. λ runs over 45 log-spaced values in [1e-6, 1e5] (a
quarter decade apart). Two things make the sweep fast without changing the problem: L-BFGS starts from a
Kronecker-factored inverse Hessian (``_Logistic.preconditioner``) instead of a multiple of the identity, and
each fit starts where the path of minimisers points (``_path_start``): about 100 evaluations of L for the
whole sweep against 460 for plain warm starts (``benchmarks/probe_speed.py``).

Features are *not* standardised (the paper fits the network's features as they are, so the λ grid
applies to their own scale). Each fit centres them on its training mean internally, which is exact,
not a change of problem: with an unregularised bias, x W + b = (x − m)W + (b + mW) is the same model
with the same penalty, so the minimiser's predictions do not change, but L-BFGS converges several
times faster on non-negative (post-ReLU) features, whose large common mean makes the problem
ill-conditioned. The stopping rule applies to the gradient in the centred parameters (W, b + mW).

**kNN probe**. Cosine similarity (features L2-normalised; an all-zero vector has similarity 0 with
everything) and a majority vote among the k nearest training examples; a tie in votes goes to the tied
class with the larger summed similarity (then to the smaller label). k is chosen by leave-one-out on the
training set among ``DEFAULT_KS`` (capped at N − 1; ties in leave-one-out score go to the smaller k).
The similarity matrix is computed ``chunk_size`` query rows at a time, and one top-k_max search per chunk
serves every candidate k, so extra memory is O(chunk_size·N + N·len(ks)), never N × N.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .accuracy import MEASURES, check_measure, score
from .lbfgs import Convergence, Precondition, lbfgs

__all__ = [
    "DEFAULT_STRENGTHS",
    "DEFAULT_KS",
    "LinearProbeResult",
    "LogisticFit",
    "KnnProbeResult",
    "stratified_split",
    "fit_logistic_regression",
    "linear_probe",
    "default_chunk_size",
    "knn_predict",
    "knn_leave_one_out",
    "knn_probe",
]

# Appendix A.2: 45 log-spaced L2 strengths between 1e-6 and 1e5, i.e. 10^(-6 + i/4).
DEFAULT_STRENGTHS = tuple(10.0 ** (-6 + i / 4) for i in range(45))
DEFAULT_KS = (1, 3, 5, 10, 20, 50, 100, 200)
# Bounds of default_chunk_size.
_CHUNK_FLOATS = 2**26
_MAX_CHUNK = 1024


@dataclass
class LinearProbeResult:
    """``accuracy``: test score in the measure; ``l2``: the selected λ; ``val_accuracies[i]``: the
    validation score of ``strengths[i]``, in sweep order (strongest regularisation first); ``fits[i]``:
    how that fit's L-BFGS ended (``lbfgs.Convergence``); ``refit``: the same for the refit on
    train + validation with ``l2``, which gives ``accuracy``."""

    accuracy: float
    l2: float
    val_accuracies: list[float]
    strengths: list[float]
    fits: list[Convergence]
    refit: Convergence

    @property
    def unconverged(self) -> list[float]:
        """The λ of the sweep whose fits did not converge (stopped at ``max_iter``), in sweep order."""
        return [l2 for l2, fit in zip(self.strengths, self.fits) if not fit.converged]


class LogisticFit(NamedTuple):
    """``fit_logistic_regression``'s answer: W (D × C), b (C) and how its L-BFGS ended."""

    weight: Tensor
    bias: Tensor
    convergence: Convergence


@dataclass
class KnnProbeResult:
    """``accuracy``: test score in the measure with the selected ``k``; ``loo_accuracies``: the
    leave-one-out training score of every candidate k."""

    accuracy: float
    k: int
    loo_accuracies: dict[int, float]


# ---------------------------------------------------------------------------------------------------
# Shared: input checks, the score and the validation split


def _num_classes(num_classes: int | None, *labels: Tensor) -> int:
    return int(max(int(y.max()) for y in labels if y.numel())) + 1 if num_classes is None else num_classes


def _check_labelled(x: Tensor, y: Tensor, num_classes: int, what: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{what}: features must be N × D, got shape {tuple(x.shape)}.")
    if y.ndim != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{what}: labels must be a 1-D integer tensor, got {y.dtype} of shape {tuple(y.shape)}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: {x.shape[0]} feature rows but {y.shape[0]} labels.")
    if x.shape[0] == 0:
        raise ValueError(f"{what}: no examples.")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{what}: labels must lie in [0, {num_classes}), got {int(y.min())}..{int(y.max())}.")


def _check_probe_inputs(train_x, train_y, test_x, test_y, num_classes, measure) -> int:
    check_measure(measure)
    num_classes = _num_classes(num_classes, train_y, test_y)
    _check_labelled(train_x, train_y, num_classes, "train")
    _check_labelled(test_x, test_y, num_classes, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} dimensions but test features {test_x.shape[1]}.")
    return num_classes


def stratified_split(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(train indices, validation indices), sorted: round(fraction · n_c) examples of each class c go to
    validation, but never a class's last one, so every class stays in training. The choice within a class
    is uniform, from ``torch.Generator().manual_seed(seed)`` on the CPU: identical on every device."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation fraction must lie in (0, 1), got {fraction}.")
    y = labels.cpu()
    keys = torch.rand(len(y), generator=torch.Generator().manual_seed(seed))
    order = keys.argsort()
    order = order[y[order].argsort(stable=True)]  # grouped by class, random order within each class
    counts = torch.bincount(y)
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(y)) - starts[y[order]]  # position of each example within its class
    n_val = torch.minimum((fraction * counts.double()).round().long(), (counts - 1).clamp(min=0))
    is_val = rank < n_val[y]
    if not is_val.any():
        raise ValueError(f"a validation fraction of {fraction} leaves no validation examples in {len(y)}.")
    device = labels.device
    return (~is_val).nonzero().squeeze(1).to(device), is_val.nonzero().squeeze(1).to(device)


# ---------------------------------------------------------------------------------------------------
# Linear probe (appendix A.2)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # float32 is the fast path (network features); float64 input is kept for exact comparisons.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Logistic:
    """Appendix A.2's objective on one training set, for fits at many strengths λ: the centred features, their
    covariance's eigendecomposition (for the preconditioner) and the last evaluation are kept between fits.

    Parameters θ = [Wᵀ (C × D, row-major), b' = b + mW] for features centred on their mean m (module docstring):
    both products of an evaluation then run in the layouts BLAS is fastest in."""

    def __init__(self, x: Tensor, y: Tensor, num_classes: int, features: tuple[Tensor, Tensor] | None = None):
        self.dtype = _compute_dtype(x)
        self.mean = x.to(self.dtype).mean(0)
        self.x, self.y = x.to(self.dtype) - self.mean, y.to(x.device)
        self.n, self.d = x.shape
        self.c = num_classes
        self.rows = torch.arange(self.n, device=x.device)
        self.features = features  # eigenvalues and eigenvectors of XᵀX/N, computed once (or another set's, as an approximation)
        self._last: tuple[Tensor, float, Tensor, Tensor] | None = None  # θ, data loss, its gradient, P − Y

    def theta(self, weight: Tensor, bias: Tensor) -> Tensor:
        weight, bias = (t.detach().to(self.x.device, self.dtype) for t in (weight, bias))
        return torch.cat([weight.T.flatten(), bias + self.mean @ weight])

    def weights(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """(W, b) of θ, for the features as given (not centred)."""
        weight = theta[: self.c * self.d].view(self.c, self.d).T
        return weight, theta[self.c * self.d:] - self.mean @ weight

    def _data_term(self, theta: Tensor) -> tuple[float, Tensor, Tensor]:
        """(Σ_i CE / N, its gradient, P − Y) at θ; the last is kept, so a fit that starts where the previous one
        ended (at another λ) gets it for nothing."""
        if self._last is not None and torch.equal(self._last[0], theta):
            return self._last[1:]
        c, d = self.c, self.d
        weight_t, bias = theta[: c * d].view(c, d), theta[c * d:]
        log_p = torch.log_softmax(torch.addmm(bias, self.x, weight_t.T), dim=1)  # faster than logsumexp on CPU
        loss = float(-log_p[self.rows, self.y].sum()) / self.n
        residual = log_p.exp_()
        residual[self.rows, self.y] -= 1
        grad = torch.empty_like(theta)
        torch.mm(residual.T, self.x, out=grad[: c * d].view(c, d))  # ∇_W = Xᵀ(P − Y)
        torch.sum(residual, 0, out=grad[c * d:])  # ∇_b = Σ_i (p_i − y_i)
        self._last = (theta, loss, grad.div_(self.n), residual)
        return self._last[1:]

    def objective(self, l2: float) -> Callable[[Tensor], tuple[float, Tensor]]:
        """θ ↦ (L/N, ∇(L/N)) at strength λ = ``l2``: the data term plus (λ/2N)‖W‖²."""
        cd = self.c * self.d

        def objective(theta: Tensor) -> tuple[float, Tensor]:
            loss, grad, _ = self._data_term(theta)
            weight = theta[:cd]
            grad = grad.clone()
            grad[:cd].add_(weight, alpha=l2 / self.n)
            return loss + 0.5 * l2 * float(weight.dot(weight)) / self.n, grad

        return objective

    def preconditioner(self, theta: Tensor, l2: float) -> Precondition:
        """v ↦ M·v with M = (A ⊗ Σ + (λ/N)·I)⁻¹ on W and A⁻¹ on b', a Kronecker-factored approximation of the
        inverse Hessian at θ (as K-FAC approximates one; Martens and Grosse 2015): the Hessian of the data term is
        (1/N) Σ_i (diag(p_i) − p_i p_iᵀ) ⊗ x_i x_iᵀ, approximated by A = (1/N) Σ_i (diag(p_i) − p_i p_iᵀ) times
        Σ = XᵀX/N, both symmetric, so M is applied in their eigenbases. A is zero along the all-ones direction
        (softmax ignores a shift of every logit), where b' has neither curvature nor gradient; its eigenvalues are
        floored at 10⁻³ of the largest there. Built from the probabilities at θ (an evaluation the fit makes first)."""
        if self.features is None:  # in the compute dtype: a preconditioner needs no more (float64 costs 2x at D = 2048)
            sigma, basis = torch.linalg.eigh(self.x.T @ self.x / self.n)
            self.features = sigma.clamp_min(0), basis
        sigma, basis = self.features
        _, _, residual = self._data_term(theta)
        p = residual.clone()
        p[self.rows, self.y] += 1
        a, classes = torch.linalg.eigh((torch.diag(p.sum(0)) - p.T @ p).double() / self.n)
        a, classes = a.clamp_min(0).to(self.dtype), classes.to(self.dtype)
        scale_w = 1 / (a[:, None] * sigma[None, :] + l2 / self.n)
        scale_b = 1 / a.clamp_min(1e-3 * float(a.max()))
        c, d = self.c, self.d

        def precondition(v: Tensor) -> Tensor:
            out = torch.empty_like(v)
            in_bases = classes.T @ v[: c * d].view(c, d) @ basis
            out[: c * d].view(c, d).copy_(classes @ (in_bases * scale_w) @ basis.T)
            out[c * d:] = classes @ (scale_b * (classes.T @ v[c * d:]))
            return out

        return precondition

    def fit(self, theta: Tensor, l2: float, max_iter: int, tol: float) -> tuple[Tensor, Convergence]:
        """Preconditioned L-BFGS (``lbfgs.lbfgs``) from θ at strength λ = ``l2``, to max |∇(L/N)| ≤ ``tol``."""
        objective = self.objective(l2)
        loss, grad = objective(theta)
        if grad.abs().max() <= tol:  # already there (a warm start): no preconditioner needed
            return theta, Convergence("gradient", 0, float(grad.abs().max()))
        return lbfgs(objective, theta, max_iter, tol, precondition=self.preconditioner(theta, l2))


def fit_logistic_regression(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    l2: float,
    init: tuple[Tensor, Tensor] | LogisticFit | None = None,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> LogisticFit:
    """One fit of appendix A.2's probe: W (D × C) and b (C) minimising Σ_i CE(x_i W + b, y_i) + (λ/2)‖W‖²_F
    with λ = ``l2`` (scikit-learn's C = 1/λ), for ``x`` as given (not standardised; centred internally,
    which changes only the speed, on one centred copy of ``x``).

    Full-batch L-BFGS (``lbfgs.lbfgs``: 10 correction pairs, weak-Wolfe line search, preconditioned by a
    Kronecker-factored inverse Hessian: ``_Logistic.preconditioner``) on L/N from ``init`` (a warm start) or
    zeros, for at most ``max_iter`` iterations, stopping once max |∇(L/N)| ≤ ``tol`` (scikit-learn's ``lbfgs``
    rule; its default ``tol`` is the same 1e-4) or when L/N stops changing at float resolution (both count as
    converged; ``convergence`` says which, after how many iterations, at what gradient), else at ``max_iter``,
    unconverged. Computed in float32 (float64 if ``x`` is float64) on ``x``'s device; the returned tensors are new.
    """
    _check_labelled(x, y, num_classes, "logistic regression")
    if l2 < 0:
        raise ValueError(f"the L2 strength must be non-negative, got {l2}.")
    problem = _Logistic(x, y, num_classes)
    d, c = problem.d, num_classes
    if init is None:
        init = (torch.zeros(d, c, device=x.device), torch.zeros(c, device=x.device))
    if init[0].shape != (d, c) or init[1].shape != (c,):
        raise ValueError(f"init must be ({d} × {c}, {c}), got {tuple(init[0].shape)} and {tuple(init[1].shape)}.")
    theta, convergence = problem.fit(problem.theta(*init[:2]), l2, max_iter, tol)  # a LogisticFit, too
    return LogisticFit(*problem.weights(theta), convergence)


def _path_start(problem: _Logistic, path: list[tuple[float, Tensor]], l2: float, tol: float) -> Tensor:
    """Where the sweep's fit at λ = ``l2`` starts: at zero for the first; at the last solution when it already meets
    ``tol`` at λ (its gradient is the one the last fit ended with plus the change of penalty: no evaluation), else
    at the secant through the last two solutions, extended linearly in log λ, which lands nearer the new minimum
    than either (the minimiser moves smoothly with log λ)."""
    if not path:
        return torch.zeros(problem.c * (problem.d + 1), dtype=problem.dtype, device=problem.x.device)
    l2_last, last = path[-1]
    if len(path) == 1 or problem.objective(l2)(last)[1].abs().max() <= tol:
        return last
    l2_before, before = path[-2]
    if l2_before == l2_last:
        return last
    return last + (math.log(l2 / l2_last) / math.log(l2_last / l2_before)) * (last - before)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int | None = None,
    measure: str = "top1",
    strengths: Sequence[float] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> LinearProbeResult:
    """Appendix A.2's linear transfer probe: select λ on a validation split, refit, score the test set.

    ``strengths`` (default: the 45 values 10^(-6 + i/4)) are swept from the strongest to the weakest,
    each fit warm-started from the previous solutions (``_path_start``). (The appendix warm-starts while *increasing* λ.
    Each fit is convex, so the direction changes only the cost, and where a fit stops at ``max_iter``,
    how far it got: from strong to weak, the first fit starts at zero, next to its heavily regularised
    solution, and the weakly regularised fits, the hardest, start from a nearby solution rather than from
    one even less regularised.) Each fit sees the training set less a stratified validation split
    (``val_fraction`` of each class, from ``seed``) and is scored on that split in ``measure``; the best
    λ wins, ties going to the stronger regularisation. The probe is then refit on train + validation
    with that λ, warm-started from its sweep solution, and scored on the test set.

    ``max_iter`` and ``tol`` apply to every fit (see ``fit_logistic_regression``). The result records how
    each fit ended (``fits``, ``refit``; ``unconverged`` lists the λ whose sweep fits hit ``max_iter``).
    Weakly regularised fits on wide features may stop at the cap without harm, as long as they are not
    chosen; if the chosen λ's sweep fit or its refit stopped at the cap, a warning names it.
    """
    num_classes = _check_probe_inputs(train_x, train_y, test_x, test_y, num_classes, measure)
    strengths = sorted(DEFAULT_STRENGTHS if strengths is None else strengths, reverse=True)
    if not strengths or min(strengths) <= 0:
        raise ValueError(f"L2 strengths must be positive, got {strengths}.")
    dtype = _compute_dtype(train_x)
    train_x, test_x = train_x.to(dtype), test_x.to(train_x.device, dtype)
    train_y, test_y = train_y.to(train_x.device), test_y.to(train_x.device)
    fit_idx, val_idx = stratified_split(train_y, val_fraction, seed)
    fit_x, fit_y, val_x, val_y = train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx]

    sweep = _Logistic(fit_x, fit_y, num_classes)
    path: list[tuple[float, Tensor]] = []  # (λ, θ) of the fits so far
    best, val_scores, fits = None, [], []
    for l2 in strengths:
        theta, convergence = sweep.fit(_path_start(sweep, path, l2, tol), l2, max_iter, tol)
        path.append((l2, theta))
        weight, bias = sweep.weights(theta)
        val_scores.append(score(torch.addmm(bias, val_x, weight), val_y, measure))
        fits.append(convergence)
        if best is None or val_scores[-1] > best[0]:  # strict: ties keep the stronger λ
            best = (val_scores[-1], l2, (weight, bias), convergence)
    _, l2, init, chosen = best
    whole = _Logistic(train_x, train_y, num_classes, features=sweep.features)  # 80 % of its images: close enough for M
    theta, refit = whole.fit(whole.theta(*init), l2, max_iter, tol)
    weight, bias = whole.weights(theta)
    for what, fit in (("sweep fit", chosen), ("refit on train + validation", refit)):
        if not fit.converged:
            warnings.warn(
                f"Linear probe: the {what} of the chosen L2 strength λ = {l2:.3g} did not converge: it stopped "
                f"({fit.stop}) after {fit.iterations} iterations (max_iter = {max_iter}) with max |gradient| = "
                f"{fit.gradient_max:.3g} > tol = {tol:g}, so the probe's score comes from an unfinished fit. "
                f"Raise max_iter.",
                stacklevel=2,
            )
    test_score = score(torch.addmm(bias, test_x, weight), test_y, measure)
    return LinearProbeResult(accuracy=test_score, l2=l2, val_accuracies=val_scores, strengths=list(strengths),
                             fits=fits, refit=refit)


# ---------------------------------------------------------------------------------------------------
# kNN probe


def default_chunk_size(num_keys: int) -> int:
    """Query rows per similarity chunk against ``num_keys`` keys: at most 1024, and the chunk × N block
    within 2^26 floats (256 MiB in float32) however large N is."""
    return max(1, min(_MAX_CHUNK, _CHUNK_FLOATS // num_keys))


def _knn_predictions(
    keys: Tensor, key_labels: Tensor, queries: Tensor | None, ks: Sequence[int], num_classes: int,
    chunk_size: int | None,
) -> Tensor:
    """Predictions (len(ks) × M) of a cosine kNN vote for each k in ``ks`` (sorted ascending). With
    ``queries=None`` the queries are the keys themselves, each one's own match excluded (leave-one-out)."""
    leave_one_out = queries is None
    # Normalise via 1/‖x‖ rather than a normalised copy of the keys: no extra N × D tensor.
    keys, key_labels = keys.float(), key_labels.to(keys.device)
    key_scale = 1.0 / torch.linalg.vector_norm(keys, dim=1).clamp_min(1e-12)
    queries = keys if leave_one_out else queries
    chunk = default_chunk_size(len(keys)) if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    k_max = ks[-1]
    predictions = torch.empty(len(ks), len(queries), dtype=torch.long, device=keys.device)
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sims = (q @ keys.T).mul_(key_scale)  # cosine similarities, chunk × N
        if leave_one_out:
            sims.diagonal(offset=start).fill_(-float("inf"))
        top_sims, top_idx = sims.topk(k_max, dim=1)  # one search serves every k
        del sims
        top_labels = key_labels[top_idx]
        votes = torch.zeros(len(q), num_classes, device=keys.device)
        sim_sums = torch.zeros(len(q), num_classes, device=keys.device)
        done = 0
        for j, k in enumerate(ks):  # grow the vote from the previous k's to this one's
            votes.scatter_add_(1, top_labels[:, done:k], torch.ones_like(top_sims[:, done:k]))
            sim_sums.scatter_add_(1, top_labels[:, done:k], top_sims[:, done:k])
            done = k
            tied_best = votes == votes.max(1, keepdim=True).values
            predictions[j, start:start + len(q)] = sim_sums.masked_fill(~tied_best, -float("inf")).argmax(1)
    return predictions


def _check_ks(ks: Sequence[int], limit: int) -> list[int]:
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be positive, got {list(ks)}.")
    return sorted({min(int(k), limit) for k in ks})


def knn_predict(
    train_x: Tensor, train_y: Tensor, query_x: Tensor, k: int, num_classes: int | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Predicted labels of ``query_x`` by a cosine-similarity majority vote of its ``k`` nearest training
    examples (vote ties: the larger summed similarity), ``chunk_size`` query rows at a time."""
    num_classes = _num_classes(num_classes, train_y)
    _check_labelled(train_x, train_y, num_classes, "kNN train")
    if query_x.ndim != 2 or query_x.shape[1] != train_x.shape[1]:
        raise ValueError(f"kNN: queries of shape {tuple(query_x.shape)} for {train_x.shape[1]}-dimensional features.")
    if not 1 <= k <= len(train_x):
        raise ValueError(f"kNN: k must lie in [1, {len(train_x)}], got {k}.")
    return _knn_predictions(train_x, train_y, query_x.to(train_x.device), [k], num_classes, chunk_size)[0]


def knn_leave_one_out(
    x: Tensor, y: Tensor, ks: Sequence[int] = DEFAULT_KS, num_classes: int | None = None,
    measure: str = "top1", chunk_size: int | None = None,
) -> dict[int, float]:
    """Leave-one-out score (``measure``) on (x, y) of the cosine kNN vote for each k in ``ks``, capped at
    N − 1: each example is classified by the others."""
    check_measure(measure)
    num_classes = _num_classes(num_classes, y)
    _check_labelled(x, y, num_classes, "kNN leave-one-out")
    if len(x) < 2:
        raise ValueError("kNN leave-one-out needs at least 2 examples.")
    ks = _check_ks(ks, len(x) - 1)
    predictions = _knn_predictions(x, y, None, ks, num_classes, chunk_size)
    return {k: score(p, y.to(p.device), measure) for k, p in zip(ks, predictions)}


def knn_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int | None = None,
    measure: str = "top1",
    ks: Sequence[int] = DEFAULT_KS,
    chunk_size: int | None = None,
) -> KnnProbeResult:
    """Table 1's kNN transfer probe: k by leave-one-out on the training set (ties: the smaller k), then the
    test score in ``measure`` of the vote among the k nearest of the whole training set."""
    num_classes = _check_probe_inputs(train_x, train_y, test_x, test_y, num_classes, measure)
    loo = knn_leave_one_out(train_x, train_y, ks, num_classes, measure, chunk_size)
    k = max(loo, key=lambda k: (loo[k], -k))
    predictions = knn_predict(train_x, train_y, test_x, k, num_classes, chunk_size)
    return KnnProbeResult(accuracy=score(predictions, test_y.to(predictions.device), measure), k=k, loo_accuracies=loo)
