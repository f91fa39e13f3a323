"""Transfer-probe speed: our linear probe against scikit-learn's, and the kNN leave-one-out's time and memory.

Linear probe (appendix A.2): the full protocol — 45 strengths swept strongest first with warm starts,
selection on a stratified validation split (``--val-fraction``, 20 %), refit on train + validation,
test score — once with ``measurements.linear_probe`` (torch, float32, on ``--device``) and once with
scikit-learn's ``LogisticRegression(solver="lbfgs", warm_start=True)`` on the CPU, side by side in one
process. Both see the same float32 features, the same split (``stratified_split``), the same grid with
C = 1/λ, the same tie rule, the same ``--tol`` (max |gradient| of the per-example-mean objective:
scikit-learn's own rule; default 1e-4, its default) and ``--max-iter`` per fit (default 100, its
default). Our fits centre the features internally (exact: the bias absorbs it), so
scikit-learn is given them centred on the training mean: the same problem, equally conditioned. A third arm runs
our protocol with ``torch.optim.LBFGS(line_search_fn="strong_wolfe")`` in place of ``measurements.lbfgs``: the
library's L-BFGS on the same fits and warm starts but without our preconditioner, which our own loop must beat
to stay.

kNN probe: leave-one-out over the candidate ks on N × D features, timed, with the peak memory beyond the
features themselves (CPU: peak resident set size after resetting it through /proc/self/clear_refs;
CUDA: ``torch.cuda.max_memory_allocated``), against the chunk's similarity block (chunk · N · 4 bytes)
and the N × N matrix it avoids.

The features are synthetic but shaped like a network's: class means in a random low-rank subspace,
correlated noise in another, isotropic noise, shifted and rectified (non-negative, like post-ReLU pooled
features), with enough overlap that the best test accuracy is far from 100 % and λ matters.

    python benchmarks/probe_speed.py --linear-n 10000 --dim 512 --classes 100 --knn-n 20000 --knn-dim 2048
"""

from __future__ import annotations

import argparse
import re
import resource
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from measurements import probes
from measurements.lbfgs import Convergence
from measurements.probes import (
    DEFAULT_KS,
    DEFAULT_STRENGTHS,
    default_chunk_size,
    knn_leave_one_out,
    linear_probe,
    score,
    stratified_split,
)


def synthetic_features(n: int, dim: int, classes: int, seed: int = 0, rank: int = 32, noise: float = 2.0):
    """(features N × dim float32, labels N): rank-``rank`` class structure buried in noise, rectified."""
    g = torch.Generator().manual_seed(seed)
    class_basis = torch.randn(rank, dim, generator=g) / rank**0.5
    noise_basis = torch.randn(rank, dim, generator=g) / rank**0.5
    means = torch.randn(classes, rank, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    latent = means[labels] + noise * torch.randn(n, rank, generator=g)
    features = latent @ class_basis + torch.randn(n, rank, generator=g) @ noise_basis
    features += 0.5 * torch.randn(n, dim, generator=g) + 0.5
    return features.relu_(), labels


def sklearn_linear_probe(train_x, train_y, test_x, test_y, strengths, val_fraction, seed, tol, max_iter):
    """Appendix A.2's protocol with scikit-learn, step for step as ``linear_probe`` does it."""
    fit_idx, val_idx = (i.numpy() for i in stratified_split(torch.from_numpy(train_y), val_fraction, seed))
    clf = LogisticRegression(solver="lbfgs", warm_start=True, tol=tol, max_iter=max_iter)
    best, iterations = None, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the weakest strengths may stop at max_iter
        for l2 in sorted(strengths, reverse=True):
            clf.set_params(C=1 / l2).fit(train_x[fit_idx], train_y[fit_idx])
            iterations += int(clf.n_iter_[0])
            val = score(torch.from_numpy(clf.decision_function(train_x[val_idx])), torch.from_numpy(train_y[val_idx]))
            if best is None or val > best[0]:
                best = (val, l2, clf.coef_.copy(), clf.intercept_.copy())
        val, l2, clf.coef_, clf.intercept_ = best
        clf.set_params(C=1 / l2).fit(train_x, train_y)
        iterations += int(clf.n_iter_[0])
    return score(torch.from_numpy(clf.decision_function(test_x)), torch.from_numpy(test_y)), l2, val, iterations


def torch_optim_lbfgs(objective, theta, max_iter: int, tol: float, history: int = 10, precondition=None):
    """``measurements.lbfgs.lbfgs``'s contract on ``torch.optim.LBFGS(line_search_fn="strong_wolfe")``, to measure
    the library's L-BFGS against ours on the same fits: the same history, iteration cap, gradient tolerance (max |∇f|)
    and relative-decrease stop (the dtype's ε). It has no preconditioner, so ``precondition`` goes unused: the
    difference is what ours buys."""
    param = torch.nn.Parameter(theta.detach().clone())
    optimiser = torch.optim.LBFGS([param], lr=1, max_iter=max_iter, history_size=history, tolerance_grad=tol,
                                  tolerance_change=torch.finfo(theta.dtype).eps, line_search_fn="strong_wolfe")

    def closure():
        loss, grad = objective(param.detach())
        param.grad = grad
        return loss

    optimiser.step(closure)
    _, grad = objective(param.detach())
    iterations = optimiser.state[param].get("n_iter", 0)
    stop = "gradient" if grad.abs().max() <= tol else ("max_iter" if iterations >= max_iter else "stalled")
    return param.detach(), Convergence(stop, iterations, float(grad.abs().max()))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def linear_benchmark(args, device: torch.device) -> None:
    x, y = synthetic_features(args.linear_n + args.linear_test, args.dim, args.classes, args.seed)
    sizes = [args.linear_n, args.linear_test]
    (train_x, test_x), (train_y, test_y) = x.split(sizes), y.split(sizes)
    common = dict(val_fraction=args.val_fraction, seed=args.seed, tol=args.tol, max_iter=args.max_iter)

    on_device = [t.to(device) for t in (train_x, train_y, test_x, test_y)]
    synchronize(device)
    start = time.perf_counter()
    ours = linear_probe(*on_device, num_classes=args.classes, **common)
    ours_s = time.perf_counter() - start

    own = probes.lbfgs
    probes.lbfgs = torch_optim_lbfgs  # the same protocol and objective, the library's L-BFGS
    try:
        synchronize(device)
        start = time.perf_counter()
        library = linear_probe(*on_device, num_classes=args.classes, **common)
        library_s = time.perf_counter() - start
    finally:
        probes.lbfgs = own

    mean = train_x.mean(0)
    start = time.perf_counter()
    theirs = sklearn_linear_probe((train_x - mean).numpy(), train_y.numpy(), (test_x - mean).numpy(), test_y.numpy(),
                                  DEFAULT_STRENGTHS, **common)
    theirs_s = time.perf_counter() - start

    print(f"\nLinear probe: {args.linear_n:,} train ({args.val_fraction:.0%} validation) / {args.linear_test:,} test, "
          f"D = {args.dim}, {args.classes} classes, {len(DEFAULT_STRENGTHS)} strengths, "
          f"tol = {args.tol:g} and max_iter = {args.max_iter} per fit for both")
    print(f"{'arm':<38}{'wall s':>9}{'selected λ':>12}{'best val':>10}{'test top-1':>12}")
    print(f"{'ours (L-BFGS in torch, ' + device.type + ', float32)':<38}{ours_s:>9.1f}{ours.l2:>12.3g}"
          f"{max(ours.val_accuracies):>10.4f}{ours.accuracy:>12.4f}")
    verdict = (f"own loop {library_s / ours_s:.2f}x faster" if library.l2 == ours.l2 else
               "selects another λ than ours and scikit-learn's: not the same answer, so no speed ratio")
    print(f"{'ours on torch.optim.LBFGS strong Wolfe':<38}{library_s:>9.1f}{library.l2:>12.3g}"
          f"{max(library.val_accuracies):>10.4f}{library.accuracy:>12.4f}   ({verdict})")
    print(f"{'scikit-learn lbfgs, warm start':<38}{theirs_s:>9.1f}{theirs[1]:>12.3g}{theirs[2]:>10.4f}"
          f"{theirs[0]:>12.4f}   ({theirs[3]} L-BFGS iterations)")
    print(f"speed-up {theirs_s / ours_s:.1f}x; "
          f"test accuracy difference {100 * (ours.accuracy - theirs[0]):+.2f} points")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux ≥ 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def knn_benchmark(args, device: torch.device) -> None:
    x, y = synthetic_features(args.knn_n, args.knn_dim, args.classes, args.seed)
    x, y = x.to(device), y.to(device)
    chunk = default_chunk_size(len(x)) if args.chunk_size is None else args.chunk_size
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        how = "torch.cuda.max_memory_allocated"
    else:
        exact = _reset_peak_rss()
        base = _rss_bytes()
        how = "peak RSS" if exact else "ru_maxrss delta (peak not resettable: a lower bound)"
    start = time.perf_counter()
    loo = knn_leave_one_out(x, y, args.ks, num_classes=args.classes, chunk_size=args.chunk_size)
    synchronize(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base  # ru_maxrss: KiB on Linux

    n = len(x)
    mib = 2.0**20
    print(f"\nkNN leave-one-out: N = {n:,}, D = {args.knn_dim}, {args.classes} classes, ks = {sorted(loo)}, "
          f"device {device.type}, chunk {chunk} rows")
    print(f"{'wall s':>8}{'peak extra MiB':>16}{'chunk·N·4 MiB':>15}{'N·D·4 MiB':>12}{'N²·4 MiB':>12}"
          "   measured by")
    print(f"{seconds:>8.1f}{peak / mib:>16.0f}{chunk * n * 4 / mib:>15.0f}{n * args.knn_dim * 4 / mib:>12.0f}"
          f"{n * n * 4 / mib:>12.0f}   {how}")
    best = max(loo, key=lambda k: (loo[k], -k))
    print("leave-one-out top-1: " + ", ".join(f"k={k}: {v:.4f}" for k, v in loo.items()) + f"  -> k = {best}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="where our probes run (scikit-learn is CPU-only)")
    parser.add_argument("--only", choices=["linear", "knn"], help="run one of the two benchmarks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--linear-n", type=int, default=10_000, help="training examples (validation included)")
    parser.add_argument("--linear-test", type=int, default=5_000)
    parser.add_argument("--dim", type=int, default=512, help="feature dimension of the linear-probe data")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--tol", type=float, default=1e-4, help="both solvers: max |gradient of the mean objective|")
    parser.add_argument("--max-iter", type=int, default=100, help="both solvers: L-BFGS iterations per fit")
    parser.add_argument("--knn-n", type=int, default=50_000)
    parser.add_argument("--knn-dim", type=int, default=2_048)
    parser.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="query rows per similarity chunk (default: the probe's default_chunk_size)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, numpy {np.__version__}")
    if args.only in (None, "linear"):
        linear_benchmark(args, device)
    if args.only in (None, "knn"):
        knn_benchmark(args, device)


if __name__ == "__main__":
    main()
