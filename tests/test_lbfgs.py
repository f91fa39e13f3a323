"""The shared L-BFGS (measurements/lbfgs.py) on textbook problems with known minima: a convex quadratic
(the minimum by a linear solve) and Rosenbrock's non-convex valley (the minimum at (1, 1))."""

import torch

from measurements.lbfgs import minimise


def test_a_convex_quadratic_reaches_the_solution_of_the_linear_system():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 20, generator=g, dtype=torch.float64)
    hessian, b = a.T @ a + 0.1 * torch.eye(20, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)

    def objective(x):  # ½xᵀAx − bᵀx, gradient Ax − b
        return float(0.5 * x @ hessian @ x - b @ x), hessian @ x - b

    x = minimise(objective, torch.zeros(20, dtype=torch.float64), max_iter=500, tol=1e-10)
    # To float64 resolution in f (the stall test): |Δx| ~ √(ε/λ_min) ~ 1e-7.
    torch.testing.assert_close(x, torch.linalg.solve(hessian, b), rtol=0, atol=1e-6)


def test_rosenbrock_from_the_classic_start_reaches_its_minimum():
    def objective(x):  # (1 − x₀)² + 100 (x₁ − x₀²)²: curved, not convex
        u, v = float(x[0]), float(x[1])
        grad = torch.tensor([-2 * (1 - u) - 400 * u * (v - u * u), 200 * (v - u * u)], dtype=torch.float64)
        return (1 - u) ** 2 + 100 * (v - u * u) ** 2, grad

    x = minimise(objective, torch.tensor([-1.2, 1.0], dtype=torch.float64), max_iter=200, tol=1e-10)
    torch.testing.assert_close(x, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
