"""Transfer probes (appendix A.2, Table 1) against scikit-learn and brute-force definitions."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from measurements.probes import (
    DEFAULT_STRENGTHS,
    fit_logistic_regression,
    knn_leave_one_out,
    knn_predict,
    knn_probe,
    linear_probe,
    stratified_split,
)
from measurements.accuracy import MeasuredAccuracy, score


def test_accumulated_accuracy_in_either_measure_equals_scikit_learn_over_uneven_batches():
    """Validation's streaming measure (per-class sums over batches) against scikit-learn on the whole set:
    accuracy_score for top1, balanced_accuracy_score (mean recall over the classes present) for mean_per_class.
    Class 4 is never a label but is predicted, and the classes are unbalanced, so the two measures differ."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    generator = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.zeros(60, dtype=torch.long), torch.randint(1, 4, (40,), generator=generator)])
    logits = torch.randn(100, 5, generator=generator) + 1.5 * F.one_hot(labels, 5)
    for measure, reference in (("top1", accuracy_score), ("mean_per_class", balanced_accuracy_score)):
        metric = MeasuredAccuracy(5, measure)
        for start, end in ((0, 7), (7, 50), (50, 100)):
            metric.update(logits[start:end], labels[start:end])
        expected = reference(labels.numpy(), logits.argmax(1).numpy())
        assert float(metric.compute()) == pytest.approx(expected, abs=1e-12) == score(logits, labels, measure)
    assert score(logits, labels, "top1") != pytest.approx(score(logits, labels, "mean_per_class"), abs=1e-3)


def blobs(n, dim=32, classes=5, spread=4.0, offset=1.0, seed=0, dtype=torch.float32):
    """Overlapping Gaussian blobs around a common offset (features with a non-zero mean, like post-ReLU
    ones), unbalanced classes; the overlap keeps the best accuracy well below 100 %."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64) + offset
    weights = torch.linspace(1.0, 2.0, classes, dtype=torch.float64)
    y = torch.multinomial(weights, n, replacement=True, generator=g)
    x = centres[y] + spread * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x.to(dtype), y


def sklearn_probabilities(clf, x):
    return torch.from_numpy(clf.predict_proba(x.numpy()))


# ---------------------------------------------------------------------------------------------------
# The measure


def test_score_top1_and_mean_per_class_by_hand():
    # Unbalanced: class 0 has 6 examples (4 right), class 1 has 3 (1 right), class 2 has 1 (right);
    # class 3 never occurs in the labels, so it does not count in the mean.
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    predictions = torch.tensor([0, 0, 0, 0, 1, 3, 1, 0, 2, 2])
    assert score(predictions, labels, "top1") == pytest.approx(6 / 10)
    assert score(predictions, labels, "mean_per_class") == pytest.approx((4 / 6 + 1 / 3 + 1 / 1) / 3)
    logits = torch.nn.functional.one_hot(predictions, 4).float() * 5 - 1  # argmax = predictions
    assert score(logits, labels, "mean_per_class") == pytest.approx((4 / 6 + 1 / 3 + 1) / 3)


def test_stratified_split_is_per_class_disjoint_and_deterministic():
    shuffle = torch.randperm(63, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0] * 50 + [1] * 10 + [2] * 2 + [3] * 1)[shuffle]
    train, val = stratified_split(labels, 0.2, seed=3)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(63))
    assert torch.bincount(labels[val], minlength=4).tolist() == [10, 2, 0, 0]  # round(0.2·n), never a class's last
    again = stratified_split(labels, 0.2, seed=3)
    assert torch.equal(again[1], val) and not torch.equal(stratified_split(labels, 0.2, seed=4)[1], val)


# ---------------------------------------------------------------------------------------------------
# Linear probe


@pytest.mark.parametrize("l2", [1e-2, 1.0, 100.0])
def test_one_fit_solves_sklearns_objective_with_lambda_one_over_c(l2):
    x, y = blobs(600, dtype=torch.float64)
    weight, bias, _ = fit_logistic_regression(x, y, 5, l2, max_iter=1000, tol=1e-8)
    # On the raw features: the fit's internal centring must not change the solution.
    clf = LogisticRegression(C=1 / l2, tol=1e-9, max_iter=10_000).fit(x.numpy(), y.numpy())
    torch.testing.assert_close(weight.T, torch.from_numpy(clf.coef_), rtol=1e-4, atol=1e-5)
    # sklearn's multinomial intercepts are defined up to a shared constant; compare probabilities.
    ours = torch.softmax(x @ weight + bias, 1)
    torch.testing.assert_close(ours, sklearn_probabilities(clf, x), rtol=0, atol=1e-5)
    # The float32 fast path solves the same problem, to float32 accuracy.
    w32, b32, _ = fit_logistic_regression(x.float(), y, 5, l2, max_iter=2000, tol=1e-5)
    assert w32.dtype == torch.float32
    torch.testing.assert_close(torch.softmax(x.float() @ w32 + b32, 1).double(), ours, rtol=0, atol=2e-3)


def test_warm_start_reaches_the_same_solution():
    x, y = blobs(300, dtype=torch.float64)
    cold = fit_logistic_regression(x, y, 5, 0.1, max_iter=1000, tol=1e-8)
    warm = fit_logistic_regression(x, y, 5, 0.1, init=fit_logistic_regression(x, y, 5, 10.0), max_iter=1000, tol=1e-8)
    torch.testing.assert_close(warm[:2], cold[:2], rtol=1e-5, atol=1e-6)
    # Started at the solution, one iteration stays there (the start is mapped into the centred fit exactly).
    again = fit_logistic_regression(x, y, 5, 0.1, init=cold, max_iter=1)
    torch.testing.assert_close(again[:2], cold[:2], rtol=1e-5, atol=1e-6)


def sklearn_sweep(x, y, xt, yt, fit_idx, val_idx, strengths, max_iter=1000):
    """The same protocol written with scikit-learn: warm-started sweep strongest first, best validation
    score (ties: stronger), refit on train + validation warm-started from that solution, test score; with
    the iterations each fit took (``max_iter``: it did not converge)."""
    clf = LogisticRegression(warm_start=True, tol=1e-6, max_iter=max_iter)
    best, val_scores, iterations = None, [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for l2 in strengths:
            clf.set_params(C=1 / l2).fit(x[fit_idx], y[fit_idx])
            val_scores.append(clf.score(x[val_idx], y[val_idx]))
            iterations.append(int(clf.n_iter_.max()))
            if best is None or val_scores[-1] > best[0]:
                best = (val_scores[-1], l2, clf.coef_.copy(), clf.intercept_.copy())
        _, l2, clf.coef_, clf.intercept_ = best
        clf.set_params(C=1 / l2).fit(x, y)
    return clf.score(xt, yt), l2, val_scores, [*iterations, int(clf.n_iter_.max())]


def test_sweep_selects_like_sklearn_and_scores_within_half_a_point():
    x, y = blobs(3200, seed=1)
    (x, xt), (y, yt) = x.split([1200, 2000]), y.split([1200, 2000])
    result = linear_probe(x, y, xt, yt)
    assert result.strengths == sorted(DEFAULT_STRENGTHS, reverse=True) and len(result.val_accuracies) == 45
    assert 0.4 < result.accuracy < 0.95  # overlap: regularisation has something to decide
    fit_idx, val_idx = (i.numpy() for i in stratified_split(y, 0.2, seed=0))
    # sklearn on the raw (uncentred) features: the probe's internal centring must not change the answer.
    accuracy, l2, *_ = sklearn_sweep(x.numpy(), y.numpy(), xt.numpy(), yt.numpy(), fit_idx, val_idx, result.strengths)
    grid = torch.tensor(result.strengths).log10()
    assert abs(float(torch.tensor(result.l2).log10() - torch.tensor(l2).log10())) <= 3 * float(grid[0] - grid[1])
    assert result.accuracy == pytest.approx(accuracy, abs=0.005)


def relu_features(n, dim=2048, classes=10, rank=32, seed=0):
    """Shaped like ResNet-50's pooled penultimate features (2,048-d, non-negative, about 40 % zeros, mean
    about 0.45, norm about 33): class means in a random rank-``rank`` subspace, correlated noise in
    another, isotropic noise, shifted and rectified (as benchmarks/probe_speed.py makes them)."""
    g = torch.Generator().manual_seed(seed)
    class_basis, noise_basis = (torch.randn(rank, dim, generator=g) / rank**0.5 for _ in range(2))
    y = torch.randint(0, classes, (n,), generator=g)
    latent = torch.randn(classes, rank, generator=g)[y] + 2.0 * torch.randn(n, rank, generator=g)
    x = latent @ class_basis + torch.randn(n, rank, generator=g) @ noise_basis + 0.5 * torch.randn(n, dim, generator=g)
    return (0.35 * (x + 0.5)).relu_(), y


# Half a decade apart, two either side of the best λ of relu_features(2200)[:1200] (10^3.5, validation
# 0.82). Left out: the weaker λ, where scikit-learn at tol 1e-6 needs hundreds to thousands of iterations
# (D > N: nearly separable), while the probe's fits meet tol = 1e-4 a few iterations from their warm start,
# 2-10 % from the optimum; and 10^5, where the logits spread by < 0.1 and the float32 fit stops at float
# resolution in the loss (max |∇| 2x tol), enough to move 5 of the 241 near-tied validation predictions.
WIDE_STRENGTHS = [10.0 ** (k / 2) for k in range(9, 4, -1)]  # 10^4.5 ... 10^2.5


@pytest.fixture(scope="module")
def wide_features():
    x, y = relu_features(2200)
    return x[:1200], y[:1200], x[1200:], y[1200:]


def test_on_2048_dimensional_relu_features_every_fit_converges_and_selects_like_sklearn(wide_features):
    from threadpoolctl import threadpool_limits

    x, y, xt, yt = wide_features
    result = linear_probe(x, y, xt, yt, strengths=WIDE_STRENGTHS)  # float32, the default max_iter and tol
    assert result.unconverged == [] and result.refit.converged
    assert all(fit.stop in ("gradient", "stalled") and fit.iterations < 100 for fit in [*result.fits, result.refit])
    fit_idx, val_idx = (i.numpy() for i in stratified_split(y, 0.2, seed=0))
    with threadpool_limits(1):  # BLAS threads spinning against each other on a shared CPU cost 20x here
        accuracy, l2, val_scores, iterations = sklearn_sweep(
            x.double().numpy(), y.numpy(), xt.double().numpy(), yt.numpy(), fit_idx, val_idx, result.strengths)
    assert max(iterations) < 1000  # the reference converged (to 1e-6) at every λ
    # Each λ's fit predicts like scikit-learn's on validation (within 2 of its 241 examples: float32
    # against float64 near-ties), so the choice is the same but for a tie (it is the same here, 10^3.5) and
    # the refit scores the same on test (here exactly, 0.81).
    assert result.val_accuracies == pytest.approx(val_scores, abs=2.5 / len(val_idx))
    grid_step = 0.5  # decades
    assert abs(math.log10(result.l2 / l2)) <= grid_step * 1.001 and 0.7 < result.accuracy < 0.95
    assert result.accuracy == pytest.approx(accuracy, abs=0.005)


def test_fits_stopped_at_the_iteration_cap_are_reported_and_the_chosen_one_warned_about(wide_features):
    x, y, xt, yt = wide_features
    with pytest.warns(UserWarning, match="did not converge") as caught:
        result = linear_probe(x, y, xt, yt, strengths=WIDE_STRENGTHS, max_iter=2)
    capped = [l2 for l2, fit in zip(result.strengths, result.fits) if fit.stop == "max_iter"]
    assert result.unconverged == capped and len(capped) >= len(WIDE_STRENGTHS) // 2
    assert all(fit.iterations == 2 and fit.gradient_max > 1e-4 for fit in result.fits if fit.stop == "max_iter")
    chosen = result.fits[result.strengths.index(result.l2)]
    expected = [fit for fit in (chosen, result.refit) if not fit.converged]
    messages = [str(w.message) for w in caught if "did not converge" in str(w.message)]
    assert len(messages) == len(expected) >= 1
    for message, fit in zip(messages, expected):
        assert f"λ = {result.l2:.3g}" in message and f"{fit.gradient_max:.3g}" in message
        assert "max_iter = 2" in message and "Raise max_iter" in message


def test_sweep_uses_the_measure_and_prefers_stronger_regularisation_on_ties():
    x, y = blobs(300, seed=3)
    result = linear_probe(x, y, x, y, measure="mean_per_class", strengths=[1e-3, 1e-2, 1e5, 1e4])
    assert result.strengths == [1e5, 1e4, 1e-2, 1e-3]
    best = max(result.val_accuracies)
    assert result.l2 == result.strengths[result.val_accuracies.index(best)]  # the first best: strongest


# ---------------------------------------------------------------------------------------------------
# kNN probe


def brute_force_votes(train_x, train_y, query_x, ks, leave_one_out=False):
    """The cosine kNN vote written plainly, full similarity matrix: majority of the k most similar,
    vote ties to the larger summed similarity, then the smaller label."""
    a = torch.nn.functional.normalize(query_x.double(), dim=1)
    b = torch.nn.functional.normalize(train_x.double(), dim=1)
    sims = a @ b.T
    if leave_one_out:
        sims.fill_diagonal_(-float("inf"))
    predictions = {k: [] for k in ks}
    for row in sims:
        order = row.argsort(descending=True)
        for k in ks:
            labels, near = train_y[order[:k]].tolist(), row[order[:k]].tolist()
            count = {c: labels.count(c) for c in set(labels)}
            total = {c: sum(s for s, l in zip(near, labels) if l == c) for c in count}
            predictions[k].append(max(count, key=lambda c: (count[c], total[c], -c)))
    return {k: torch.tensor(p) for k, p in predictions.items()}


def test_knn_predictions_equal_sklearn_cosine_knn():
    x, y = blobs(300, dim=16, classes=2, spread=4.0, seed=4)
    queries, _ = blobs(120, dim=16, classes=2, spread=4.0, seed=5)
    for k in [1, 3, 7, 15]:  # two classes, odd k: no vote ties, where sklearn's rule (smaller label) differs
        ours = knn_predict(x, y, queries, k)
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x.numpy(), y.numpy())
        assert torch.equal(ours, torch.from_numpy(clf.predict(queries.numpy())))


def test_knn_predictions_equal_sklearn_where_the_vote_is_not_tied():
    x, y = blobs(300, dim=16, classes=4, spread=4.0, seed=6)
    queries, _ = blobs(200, dim=16, classes=4, spread=4.0, seed=7)
    k = 6
    ours = knn_predict(x, y, queries, k)
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(x.numpy(), y.numpy())
    theirs = torch.from_numpy(clf.predict(queries.numpy()))
    near = (torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(x, dim=1).T).topk(k).indices
    counts = torch.nn.functional.one_hot(y[near], 4).sum(1).sort(1, descending=True).values
    untied = counts[:, 0] > counts[:, 1]
    assert 0 < (~untied).sum() < len(untied)  # the data has both kinds
    assert torch.equal(ours[untied], theirs[untied])
    assert torch.equal(ours, brute_force_votes(x, y, queries, [k])[k])  # and ties follow the documented rule


@pytest.mark.parametrize("measure", ["top1", "mean_per_class"])
def test_leave_one_out_equals_brute_force_for_every_k(measure):
    x, y = blobs(150, dim=12, classes=4, spread=3.0, seed=8)
    ks = [1, 2, 3, 4, 5, 10, 20, 50, 200]  # even k: vote ties; 200 > N − 1 is capped to 149
    loo = knn_leave_one_out(x, y, ks, measure=measure)
    brute = brute_force_votes(x, y, x, [*ks[:-1], 149], leave_one_out=True)
    expected = {k: score(p, y, measure) for k, p in brute.items()}
    assert loo == pytest.approx(expected, abs=1e-12) and list(loo) == [*ks[:-1], 149]
    for chunk in [1, 7, len(x)]:
        assert knn_leave_one_out(x, y, ks, measure=measure, chunk_size=chunk) == loo

    xt, yt = blobs(90, dim=12, classes=4, spread=3.0, seed=9)
    result = knn_probe(x, y, xt, yt, measure=measure, ks=ks)
    best = max(expected.values())
    assert result.k == min(k for k, v in expected.items() if v == best)  # brute-force argmax, ties: smaller k
    assert result.loo_accuracies == loo
    assert result.accuracy == score(brute_force_votes(x, y, xt, [result.k])[result.k], yt, measure)
    for chunk in [1, 7, len(x)]:
        assert knn_probe(x, y, xt, yt, measure=measure, ks=ks, chunk_size=chunk) == result


def test_leave_one_out_excludes_only_the_example_itself():
    x, y = blobs(60, dim=8, classes=3, spread=5.0, seed=10)
    twice_x, twice_y = torch.cat([x, x]), torch.cat([y, y])  # each example has an exact duplicate
    assert knn_leave_one_out(twice_x, twice_y, [1], chunk_size=7) == {1: 1.0}


def test_equal_leave_one_out_scores_choose_the_smaller_k():
    x, y = blobs(60, dim=8, classes=3, spread=0.05, seed=11)  # far apart: every k is perfect
    result = knn_probe(x, y, x, y, ks=[5, 3, 10])
    assert result.loo_accuracies == {3: 1.0, 5: 1.0, 10: 1.0} and result.k == 3


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("probe", [linear_probe, knn_probe])
def test_bad_input_is_refused_with_a_clear_message(probe):
    x, y = blobs(40, dim=4, classes=3)
    with pytest.raises(ValueError, match="40 feature rows but 39 labels"):
        probe(x, y[:39], x, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        probe(x, y + 1, x, y, num_classes=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got -1"):
        probe(x, y - 1, x, y, num_classes=3)
    with pytest.raises(ValueError, match="unknown measure 'top5'"):
        probe(x, y, x, y, measure="top5")
    with pytest.raises(ValueError, match="4 dimensions but test features 3"):
        probe(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="1-D integer"):
        probe(x, y.float(), x, y)


def test_score_refuses_mismatched_predictions_and_unknown_measures():
    with pytest.raises(ValueError, match="unknown measure 'top-1'"):
        score(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), "top-1")
    with pytest.raises(ValueError, match=r"\(4,\) predictions for \(3,\) labels"):
        score(torch.zeros(4, dtype=torch.long), torch.zeros(3, dtype=torch.long))
