"""Linear CKA (Eq. 10, Figure 2) and prediction agreement (Figure C.4) against brute-force definitions.

The unbiased HSIC is checked against two references written independently of the code: its formula with
zeroed diagonals in plain Python loops, and Song et al.'s (2012) definition as a U-statistic over distinct
index quadruples. The H-centred form tr(KHLH)/(n−1)² is the biased estimator and serves only the biased
feature-space CKA.
"""

import itertools
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from measurements import (
    MinibatchCKA,
    PredictionAgreement,
    feature_space_cka,
    gram,
    linear_cka,
    prediction_agreement,
    unbiased_hsic,
)
from measurements import cka as cka_module


def loop_hsic(K, L) -> float:
    """HSIC₁ = [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)), element by element."""
    K, L = K.tolist(), L.tolist()
    n = len(K)
    k = [[0.0 if i == j else K[i][j] for j in range(n)] for i in range(n)]
    l = [[0.0 if i == j else L[i][j] for j in range(n)] for i in range(n)]
    trace = sum(k[i][j] * l[j][i] for i in range(n) for j in range(n))
    total_k, total_l = sum(map(sum, k)), sum(map(sum, l))
    ones_k_l_ones = sum(k[i][j] * l[j][q] for i in range(n) for j in range(n) for q in range(n))
    return (trace + total_k * total_l / ((n - 1) * (n - 2)) - 2 / (n - 2) * ones_k_l_ones) / (n * (n - 3))


def u_statistic_hsic(K, L) -> float:
    """Song et al. 2012: the mean over distinct (i, j, q, r) of k_ij l_ij + k_ij l_qr − 2 k_ij l_iq."""
    K, L = K.tolist(), L.tolist()
    terms = [K[i][j] * L[i][j] + K[i][j] * L[q][r] - 2 * K[i][j] * L[i][q]
             for i, j, q, r in itertools.permutations(range(len(K)), 4)]
    return sum(terms) / len(terms)


def layers(n: int, seed: int = 0):
    """Two related post-ReLU layers of n examples: a conv-shaped map and a narrower one driven by half its causes."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g, dtype=torch.float64)
    x = (z @ torch.randn(8, 3 * 4 * 4, generator=g, dtype=torch.float64) + torch.randn(n, 48, generator=g)).relu()
    y = (z[:, :4] @ torch.randn(4, 20, generator=g, dtype=torch.float64) + 2 * torch.randn(n, 20, generator=g)).relu()
    return x.reshape(n, 3, 4, 4), y


@pytest.mark.parametrize("n", [4, 5, 8])
def test_unbiased_hsic_matches_its_formula_in_loops_and_the_u_statistic(n):
    x, y = layers(n, seed=n)
    K, L = gram(x), gram(y)
    assert K.dtype == torch.float64 and K.shape == (n, n)
    assert torch.allclose(K, x.flatten(1) @ x.flatten(1).T)
    for k, l in ((K, L), (K, K), (L, L)):
        reference = loop_hsic(k, l)
        assert float(unbiased_hsic(k, l)) == pytest.approx(reference, rel=1e-10, abs=1e-12)
        assert u_statistic_hsic(k, l) == pytest.approx(reference, rel=1e-10, abs=1e-12)


def test_the_diagonal_minus_a_vector_bug_would_be_caught(monkeypatch):
    # K − diag(K) with diag(K) a vector broadcasts to K_ij − K_jj; the references above must reject it.
    x, y = layers(6)
    K, L = gram(x), gram(y)
    assert float(unbiased_hsic(K, L)) == pytest.approx(loop_hsic(K, L), rel=1e-10)
    monkeypatch.setattr(cka_module, "_zero_diagonal", lambda g: g - torch.diagonal(g, dim1=-2, dim2=-1).unsqueeze(-2))
    assert float(unbiased_hsic(K, L)) != pytest.approx(loop_hsic(K, L), rel=1e-3)
    metric = MinibatchCKA(1, 1)
    metric.update(K[None], L[None])
    assert float(metric.hsic_ab) != pytest.approx(loop_hsic(K, L), rel=1e-3)


def test_cka_of_a_layer_with_itself_is_one():
    x, _ = layers(50)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert feature_space_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    metric = MinibatchCKA(2, 2)
    for batch in x.split(20):  # 20, 20, 10
        metric.update(torch.stack([gram(batch), gram(batch.relu().sqrt())]))  # one network against itself
    cka = metric.compute()
    assert torch.allclose(cka.diagonal(), torch.ones(2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(cka, cka.T, atol=1e-14) and cka[0, 1] < 0.999


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling_but_not_anisotropic():
    x, y = layers(60)
    x = x.flatten(1)
    q_x = torch.linalg.qr(torch.randn(48, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    q_y = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64))[0]
    for cka in (linear_cka, feature_space_cka):
        base = cka(x, y)
        assert 0.05 < base < 0.95
        assert cka(x @ q_x, y) == pytest.approx(base, rel=1e-10)
        assert cka(x, y @ q_y) == pytest.approx(base, rel=1e-10)
        assert cka(7.5 * x, y) == pytest.approx(base, rel=1e-10)
        assert cka(x, 0.01 * y) == pytest.approx(base, rel=1e-10)
        stretch = torch.ones(48, dtype=torch.float64)
        stretch[:5] = 10.0
        assert cka(x * stretch, y) != pytest.approx(base, rel=1e-3)  # a test of anything, not of nothing


def test_feature_space_form_equals_the_biased_gram_form():
    x, y = layers(40)
    x, y = x.flatten(1).numpy(), y.numpy()
    n = len(x)
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = H @ (x @ x.T) @ H, H @ (y @ y.T) @ H
    biased = np.trace(K @ L) / math.sqrt(np.trace(K @ K) * np.trace(L @ L))
    assert feature_space_cka(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(biased, rel=1e-10)
    assert linear_cka(torch.from_numpy(x), torch.from_numpy(y)) != pytest.approx(biased, rel=1e-3)  # unbiased ≠ biased


def test_float64_grams_survive_a_large_common_offset():
    # HSIC₁ of a linear kernel is exactly invariant to translating every example by the same vector (its
    # U-statistic is a sum of double differences (x_t − x_w)·(x_u − x_v)); large positive activations
    # then cancel in the sums, which float32 Gram products do not survive.
    x, y = layers(200)
    x = x.flatten(1)
    base = linear_cka(x, y)
    assert linear_cka(x + 100, y + 100) == pytest.approx(base, abs=1e-7)
    assert linear_cka(x.float() + 100, y.float() + 100) == pytest.approx(base, abs=1e-6)  # float32 input, float64 Gram


def test_one_batch_gives_the_full_data_unbiased_cka_for_every_pair():
    n = 30
    net_a = [layers(n, seed=s)[0] for s in range(3)]
    net_b = [layers(n, seed=s)[1] for s in (0, 5)]
    metric = MinibatchCKA(3, 2)
    metric.update(torch.stack([gram(x) for x in net_a]), torch.stack([gram(y) for y in net_b]))
    cka = metric.compute()
    assert cka.shape == (3, 2) and cka.dtype == torch.float64
    expected = torch.tensor([[linear_cka(x, y) for y in net_b] for x in net_a], dtype=torch.float64)
    assert torch.allclose(cka, expected, rtol=1e-12, atol=1e-14)


def test_unequal_batches_each_carry_their_own_normalisation():
    x, y = layers(52)
    sizes = [40, 7, 5]
    batches = list(zip(x.split(sizes), y.split(sizes)))
    metric = MinibatchCKA(1, 1)
    for bx, by in batches:
        metric.update(gram(bx)[None], gram(by)[None])
    per_batch = [(loop_hsic(gram(bx), gram(by)), loop_hsic(gram(bx), gram(bx)), loop_hsic(gram(by), gram(by)))
                 for bx, by in batches]
    kl, kk, ll = (np.array(column) for column in zip(*per_batch))
    assert float(metric.hsic_ab) == pytest.approx(kl.sum(), rel=1e-10)
    assert float(metric.hsic_aa) == pytest.approx(kk.sum(), rel=1e-10)
    assert float(metric.hsic_bb) == pytest.approx(ll.sum(), rel=1e-10)
    ratio_of_sums = kl.sum() / math.sqrt(kk.sum() * ll.sum())
    assert float(metric.compute()) == pytest.approx(ratio_of_sums, rel=1e-10)
    # Dropping the per-batch 1/(n(n−3)) (exact only for equal batches) and averaging per-batch CKA both differ.
    weight = np.array([n * (n - 3) for n in sizes], dtype=np.float64)
    without_factor = (kl * weight).sum() / math.sqrt((kk * weight).sum() * (ll * weight).sum())
    mean_of_cka = (kl / np.sqrt(kk * ll)).mean()
    assert float(metric.compute()) != pytest.approx(without_factor, rel=1e-3)
    assert float(metric.compute()) != pytest.approx(mean_of_cka, rel=1e-3)


def test_minibatch_estimate_approaches_the_full_data_estimate_as_batches_grow():
    n = 1200
    x, y = layers(n, seed=3)
    full = linear_cka(x, y)

    def mean_error(batch: int) -> float:
        errors = []
        for seed in range(3):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            metric = MinibatchCKA(1, 1)
            for idx in order.split(batch):
                metric.update(gram(x[idx])[None], gram(y[idx])[None])
            errors.append(abs(float(metric.compute()) - full))
        return float(np.mean(errors))

    small, large = mean_error(12), mean_error(600)
    assert large < small / 3 and large < 0.005, (small, large)


def test_batches_of_three_or_fewer_are_refused_with_the_reason():
    x, y = layers(3)
    with pytest.raises(ValueError, match=r"more than 3 examples.*n\(n−3\).*larger batches"):
        unbiased_hsic(gram(x), gram(y))
    with pytest.raises(ValueError, match="more than 3 examples"):
        linear_cka(x, y)
    with pytest.raises(ValueError, match="more than 3 examples"):
        MinibatchCKA(1, 1).update(gram(x)[None], gram(y)[None])


def test_mismatched_grams_are_named():
    x, y = layers(10)
    metric = MinibatchCKA(2, 1)
    with pytest.raises(ValueError, match=r"grams_a must be \(2, n, n\)"):
        metric.update(gram(x)[None], gram(y)[None])
    with pytest.raises(ValueError, match="same batch"):
        metric.update(torch.stack([gram(x), gram(x)]), gram(y[:8])[None])
    with pytest.raises(ValueError, match="num_layers_a == num_layers_b"):
        metric.update(torch.stack([gram(x), gram(x)]))


def brute_force_agreement(a, b, labels):
    a, b, labels = a.tolist(), b.tolist(), labels.tolist()
    same = both_ok = both_wrong = same_wrong = both_right = a_alone = b_alone = 0
    for p, q, t in zip(a, b, labels):
        same += p == q
        both_ok += (p == t) == (q == t)
        both_right += p == t and q == t
        a_alone += p == t and q != t
        b_alone += p != t and q == t
        if p != t and q != t:
            both_wrong += 1
            same_wrong += p == q
    n = len(labels)
    return {"agreement": same / n, "both_right_or_both_wrong": both_ok / n, "both_wrong": both_wrong / n,
            "shared_wrong": same_wrong / both_wrong if both_wrong else float("nan"), "both_right": both_right / n,
            "a_right_alone": a_alone / n, "b_right_alone": b_alone / n}


def agreement_data(n: int = 300, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    scores_a = torch.randn(n, classes, generator=g) + 1.5 * torch.nn.functional.one_hot(labels, classes)
    scores_b = 0.7 * scores_a + torch.randn(n, classes, generator=g)  # correlated, so mistakes are partly shared
    return scores_a, scores_b, labels


def test_prediction_agreement_matches_a_loop_from_class_indices_or_scores():
    scores_a, scores_b, labels = agreement_data()
    a, b = scores_a.argmax(1), scores_b.argmax(1)
    expected = brute_force_agreement(a, b, labels)
    assert 0 < expected["both_wrong"] and 0 < expected["shared_wrong"] < 1 and expected["agreement"] < 1
    assert 0 < expected["a_right_alone"] and 0 < expected["b_right_alone"]
    assert prediction_agreement(a, b, labels) == pytest.approx(expected, rel=1e-12)
    assert prediction_agreement(scores_a, scores_b, labels) == pytest.approx(expected, rel=1e-12)


def test_shared_wrong_is_nan_when_no_example_is_wrong_for_both():
    labels = torch.tensor([0, 1, 2, 3])
    result = prediction_agreement(torch.tensor([0, 1, 0, 3]), torch.tensor([0, 0, 2, 3]), labels)
    assert math.isnan(result["shared_wrong"]) and result["both_wrong"] == 0
    assert result["agreement"] == 0.5 and result["both_right_or_both_wrong"] == 0.5


def test_streaming_agreement_equals_the_function():
    scores_a, scores_b, labels = agreement_data(seed=1)
    metric = PredictionAgreement()
    for sa, sb, t in zip(scores_a.split(37), scores_b.split(37), labels.split(37)):  # uneven last batch
        metric.update(sa.argmax(1), sb.argmax(1), t)
    assert metric.compute() == pytest.approx(prediction_agreement(scores_a, scores_b, labels), rel=1e-12)


def _ddp_batches():
    x, y = layers(120, seed=7)
    sizes = [30, 25, 20, 17, 12, 9, 7]  # unequal: each batch's normalisation must travel with it
    grams_a = [torch.stack([gram(bx), gram(bx.relu().sqrt())]) for bx in x.split(sizes)]
    grams_b = [torch.stack([gram(by), gram(by[:, :5]), gram(by.square())]) for by in y.split(sizes)]
    scores_a, scores_b, labels = agreement_data(n=120, seed=2)
    agreement = list(zip(scores_a.split(sizes), scores_b.split(sizes), labels.split(sizes)))
    return list(zip(grams_a, grams_b)), agreement


def _rank(rank: int, world: int, port: int, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cka, agreement = MinibatchCKA(2, 3), PredictionAgreement()
    grams, predictions = _ddp_batches()
    for ga, gb in grams[rank::world]:
        cka.update(ga, gb)
    for batch in predictions[rank::world]:
        agreement.update(*batch)
    out[rank] = (cka.compute().numpy(), agreement.compute())
    dist.destroy_process_group()


def test_two_ddp_processes_give_the_single_process_values(free_port):
    grams, predictions = _ddp_batches()
    single, single_agreement = MinibatchCKA(2, 3), PredictionAgreement()
    for ga, gb in grams:
        single.update(ga, gb)
    for batch in predictions:
        single_agreement.update(*batch)
    expected = single.compute().numpy()
    assert not np.isnan(expected).any() and expected.shape == (2, 3)
    out = mp.Manager().dict()
    mp.spawn(_rank, args=(2, free_port, out), nprocs=2)
    for rank in (0, 1):
        cka, agreement = out[rank]
        np.testing.assert_allclose(cka, expected, rtol=0, atol=1e-12)
        assert agreement == pytest.approx(single_agreement.compute(), rel=1e-12)
