"""Full-batch L-BFGS for the measurements' small smooth minimisations: the linear probe's logistic
regression (``probes.fit_logistic_regression``: convex, thousands of parameters) and temperature scaling
(``calibration.fit_temperature``: one parameter, log T, not convex).

``minimise(objective, theta, max_iter, tol)``: θ ← θ + t·d, with d = −H∇f from the last ``history``
(s, y) pairs by the two-loop recursion (Nocedal 1980; Nocedal and Wright, Algorithm 7.4), and t from a
weak-Wolfe line search (``_line_search``) that tries the quasi-Newton step t = 1 first.

The recursion starts from H₀ = γ·I with γ = sᵀy/yᵀy of the newest pair (their eq. 7.20), or, given a
``precondition`` M (any symmetric positive definite approximation of the inverse Hessian, applied to a
vector), from H₀ = γ·M with γ = sᵀy/yᵀMy: the pairs then correct M instead of a multiple of the
identity, which is where a problem's curvature is far from isotropic (the probe's Kronecker-factored M,
``probes._Logistic.preconditioner``, cuts its L-BFGS iterations about threefold). Before the first pair,
the first step is d = −M∇f with t = 1 tried first, or, without M, at most 1 long in the ℓ1 norm.

Why one loop serves both, convex or not:

- An accepted step has sufficient decrease (Armijo) *and* meets the curvature condition
  ∇f(θ + t·d)ᵀd ≥ c₂·∇f(θ)ᵀd, which gives, for *any* smooth f,
  sᵀy = t·(∇f(θ + t·d) − ∇f(θ))ᵀd ≥ (1 − c₂)·t·|∇f(θ)ᵀd| > 0. So every pair has positive curvature, H
  stays positive definite and the next d is a descent direction (Nocedal and Wright, section 6.1). Such
  a step exists whenever f is bounded below along d (their Lemma 3.1).
- Armijo alone (backtracking from t = 1, which this loop did while it served only the convex probe) is
  not enough off convexity: where f curves downwards every step has sᵀy < 0, no pair is stored, and the
  step, with no curvature known, stays the short first one (at most 1 in the ℓ1 norm), since
  backtracking only shortens. Fitting T for an underconfident model from T = 1, through the region where
  the NLL is concave in log T, then crawled a few thousandths of log T per iteration and stopped at
  max_iter far from the minimum (tests/test_calibration.py). The curvature condition doubles such steps.
- c₂ = 0.99 rather than the usual 0.9: any c₂ in (c₁, 1) gives the guarantees above, and 0.99 lengthens
  only steps along which the slope flattened by less than 1 %. With 0.9 the probe's fits lengthened more
  of their steps, for 18 % more function evaluations than Armijo alone in benchmarks/probe_speed.py and
  no fewer iterations; with 0.99, 2 % more.
- A pair with sᵀy ≤ ε·yᵀy (float noise, or a search that ran out of trials) is still skipped.
- On a convex f the stationary point reached is the global minimum; on a non-convex f, a local one. A
  caller whose f may have several says which one it gets (``fit_temperature``).

``objective(θ)`` returns (f as a float, ∇f as a tensor shaped like θ, 1-D). Stops when max |∇f| ≤ ``tol``,
after ``max_iter`` iterations, or when f stops decreasing at float resolution (relative decrease ≤ the
dtype's ε: scipy's ``ftol`` test), beyond which float32 cannot go. ``lbfgs`` returns θ with a
``Convergence`` record saying which of these ended the run (the first two are convergence, the cap is
not); ``minimise`` returns θ alone.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Convergence", "Precondition", "lbfgs", "minimise"]

Precondition = Callable[[Tensor], Tensor]  # v ↦ M·v, M ≈ the inverse Hessian, symmetric positive definite

# Weak Wolfe constants (Nocedal and Wright, eq. 3.6): sufficient decrease and curvature (module docstring).
SUFFICIENT_DECREASE = 1e-4
CURVATURE = 0.99


@dataclass(frozen=True)
class Convergence:
    """How one L-BFGS run ended. ``stop``: ``"gradient"`` (max |∇f| ≤ tol), ``"stalled"`` (f stopped
    decreasing at float resolution: the relative-decrease test, a line search that found no decrease, or a
    direction that is no longer one of descent), ``"max_iter"`` (the iteration cap, before either) or
    ``"not finite"`` (f or ∇f became NaN or infinite). ``iterations``: L-BFGS iterations taken;
    ``gradient_max``: max |∇f| at the returned θ."""

    stop: str
    iterations: int
    gradient_max: float

    @property
    def converged(self) -> bool:
        return self.stop in ("gradient", "stalled")


def _direction(grad: Tensor, pairs: deque[tuple[Tensor, Tensor]], precondition: Precondition | None) -> Tensor:
    """−H∇f by the two-loop recursion over the stored (step s, gradient change y) pairs, with the initial
    inverse Hessian γ·M, M = ``precondition`` or I and γ = sᵀy/yᵀMy of the newest pair, 1 before there is one
    (Nocedal and Wright, Algorithm 7.4)."""
    q, alphas = -grad, []
    for s, y in reversed(pairs):
        alpha = s.dot(q) / s.dot(y)
        q = q - alpha * y
        alphas.append(alpha)
    if precondition is not None:
        q = precondition(q)
    if pairs:
        s, y = pairs[-1]
        q = q * (s.dot(y) / y.dot(precondition(y) if precondition is not None else y))
    for (s, y), alpha in zip(pairs, reversed(alphas)):
        q = q + (alpha - y.dot(q) / s.dot(y)) * s
    return q


def _line_search(
    objective: Callable[[Tensor], tuple[float, Tensor]], theta: Tensor, direction: Tensor, loss: float, slope: float,
    step: float, max_evals: int = 30,
) -> tuple[float, float, Tensor] | None:
    """(t, f(θ + t·d), ∇f(θ + t·d)) for a step t meeting the weak Wolfe conditions (Nocedal and Wright,
    eq. 3.6), where f(θ) = ``loss`` and ∇f(θ)ᵀd = ``slope`` < 0:

        f(θ + t·d) ≤ f(θ) + c₁·t·∇f(θ)ᵀd      (sufficient decrease, c₁ = SUFFICIENT_DECREASE)
        ∇f(θ + t·d)ᵀd ≥ c₂·∇f(θ)ᵀd            (curvature, c₂ = CURVATURE)

    found by bracketing from ``step`` (as in Lewis and Overton 2013): a trial failing the first condition
    is too long, and is cut by safeguarded quadratic interpolation while no shorter trial has passed (the
    minimum of the quadratic through f(0), f'(0) and f(t), kept within [0.1, 0.5]·t; a NaN or infinite
    f(t) gives 0.1), else by bisection; a trial failing only the second is too short, and is doubled, or
    bisected once a too-long one is known. A trial that passes the first condition without lowering f at
    all (f flat at float resolution, where the slope cannot be trusted) is returned as it is, and the
    caller's stall test ends the fit. After ``max_evals`` trials: the longest trial that met the first
    condition, or None if none did.
    """
    lo, hi, longest = 0.0, math.inf, None
    for _ in range(max_evals):
        new_loss, new_grad = objective(theta + step * direction)
        if not new_loss <= loss + SUFFICIENT_DECREASE * step * slope:  # NaN fails too
            hi = step
            if lo == 0:
                step *= min(0.5, max(0.1, -slope * step / (2 * (new_loss - loss - slope * step))))
            else:
                step = (lo + hi) / 2
        elif new_loss < loss and float(new_grad.dot(direction)) < CURVATURE * slope:
            lo, longest = step, (step, new_loss, new_grad)
            step = 2 * step if hi == math.inf else (lo + hi) / 2
        else:
            return step, new_loss, new_grad
    return longest


def lbfgs(
    objective: Callable[[Tensor], tuple[float, Tensor]], theta: Tensor, max_iter: int, tol: float, history: int = 10,
    precondition: Precondition | None = None,
) -> tuple[Tensor, Convergence]:
    """(θ minimising ``objective`` from ``theta`` (1-D), how the run ended) by L-BFGS with ``history`` pairs
    (scipy's default 10), a weak-Wolfe line search and an optional ``precondition`` (H₀ = γ·M); the module
    docstring says why for convex and non-convex f."""
    eps = torch.finfo(theta.dtype).eps
    loss, grad = objective(theta)
    pairs: deque[tuple[Tensor, Tensor]] = deque(maxlen=history)
    stop, iterations = "max_iter", 0
    while True:
        if grad.abs().max() <= tol:  # checked after the last iteration too: the cap is reached only above tol
            stop = "gradient"
            break
        if iterations == max_iter:
            break
        direction = _direction(grad, pairs, precondition)
        slope = float(grad.dot(direction))
        if not slope < 0:  # H is positive definite, so only at float resolution (or NaN): stop
            stop = "stalled" if math.isfinite(slope) else "not finite"
            break
        # No curvature known yet: M's step as it is, or one at most 1 long in the ℓ1 norm (torch's LBFGS rule).
        first = 1.0 if pairs or precondition is not None else min(1.0, 1.0 / float(grad.abs().sum()))
        found = _line_search(objective, theta, direction, loss, slope, first)
        if found is None:
            stop = "stalled"  # no decrease found: the line is flat at float resolution
            break
        step, new_loss, new_grad = found
        s, y = step * direction, new_grad - grad
        if s.dot(y) > eps * y.dot(y):  # Wolfe makes sᵀy > 0; this catches float noise and a search cut short
            pairs.append((s, y))
        stalled = loss - new_loss <= eps * max(abs(loss), abs(new_loss), 1.0)
        theta, loss, grad = theta + s, new_loss, new_grad
        iterations += 1
        if stalled:
            stop = "stalled"
            break
    return theta, Convergence(stop, iterations, float(grad.abs().max()))


def minimise(
    objective: Callable[[Tensor], tuple[float, Tensor]], theta: Tensor, max_iter: int, tol: float, history: int = 10
) -> Tensor:
    """θ alone from ``lbfgs``, for callers that need no record of how it ended."""
    return lbfgs(objective, theta, max_iter, tol, history)[0]
