"""The shared L-BFGS (measurements/lbfgs.py) on textbook problems with known minima: a convex quadratic
(the minimum by a linear solve) and Rosenbrock's non-convex valley (the minimum at (1, 1))."""

import torch

from measurements.lbfgs import Convergence, lbfgs, minimise


def test_a_convex_quadratic_reaches_the_solution_of_the_linear_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 20, generator=g, dtype=torch.float64)
    hessian, b = a.T @ a + 0.1 * torch.eye(20, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)

    def objective(x):  # ½xᵀAx − bᵀx, gradient Ax − b
        return float(0.5 * x @ hessian @ x - b @ x), hessian @ x - b

    x = minimise(objective, torch.zeros(20, dtype=torch.float64), max_iter=500, tol=1e-10)
    # To float64 resolution in f (the stall test): |Δx| ~ √(ε/λ_min) ~ 1e-7.
    torch.testing.assert_close(x, torch.linalg.solve(hessian, b), rtol=0, atol=1e-6)


def rosenbrock(x):  # (1 − x₀)² + 100 (x₁ − x₀²)²: curved, not convex
    u, v = float(x[0]), float(x[1])
    grad = torch.tensor([-2 * (1 - u) - 400 * u * (v - u * u), 200 * (v - u * u)], dtype=torch.float64)
    return (1 - u) ** 2 + 100 * (v - u * u) ** 2, grad


def test_rosenbrock_from_the_classic_start_reaches_its_minimum():
    x = minimise(rosenbrock, torch.tensor([-1.2, 1.0], dtype=torch.float64), max_iter=200, tol=1e-10)
    torch.testing.assert_close(x, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)


def test_the_record_says_how_a_run_ended():
    start = torch.tensor([-1.2, 1.0], dtype=torch.float64)
    x, capped = lbfgs(rosenbrock, start, max_iter=5, tol=1e-10)  # far from (1, 1) after 5 iterations
    assert (capped.stop, capped.iterations, capped.converged) == ("max_iter", 5, False)
    assert capped.gradient_max == float(rosenbrock(x)[1].abs().max()) > 1e-10
    _, done = lbfgs(rosenbrock, start, max_iter=200, tol=1e-6)
    assert done.converged and done.stop == "gradient" and done.gradient_max <= 1e-6 and 5 < done.iterations < 200
    # Started at the minimum: no iteration; a NaN objective is not convergence.
    assert lbfgs(rosenbrock, torch.ones(2, dtype=torch.float64), 5, 1e-10)[1] == Convergence("gradient", 0, 0.0)
    nan = lbfgs(lambda x: (float("nan"), torch.full_like(x, float("nan"))), start, 5, 1e-10)[1]
    assert nan.stop == "not finite" and not nan.converged
    assert torch.equal(minimise(rosenbrock, start, 200, 1e-6), lbfgs(rosenbrock, start, 200, 1e-6)[0])
