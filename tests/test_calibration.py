"""Calibration (Table C.3; Guo et al. 2017): NLL and ECE against hand computation, temperature scaling
on data drawn at a known temperature, sigmoid-normalised probabilities, and input checks."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import log_expit, log_softmax, logsumexp

from measurements.calibration import (
    calibration_statistics,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    probabilities,
)

# Six examples, three classes; confidences 0.7, 0.5, 0.9, 0.8, 0.4, 0.75 (0.5 and 0.75 sit on bin edges).
PROBS = torch.tensor([
    [0.2, 0.7, 0.1],    # label 1: right
    [0.5, 0.25, 0.25],  # label 1: wrong
    [0.9, 0.05, 0.05],  # label 0: right
    [0.1, 0.1, 0.8],    # label 0: wrong
    [0.4, 0.35, 0.25],  # label 0: right
    [0.25, 0.75, 0.0],  # label 1: right
], dtype=torch.float64)
LABELS = torch.tensor([1, 1, 0, 0, 0, 1])


def test_ece_by_hand_with_bins_closed_on_the_right():
    # Four bins (0, .25], (.25, .5], (.5, .75], (.75, 1]: 0.5 falls in the second, 0.75 in the third.
    #   (.25, .5]: confidences .5 (wrong), .4 (right)   acc 1/2, conf .45,  |gap| .05
    #   (.5, .75]: confidences .7 (right), .75 (right)  acc 1,   conf .725, |gap| .275
    #   (.75, 1]:  confidences .9 (right), .8 (wrong)   acc 1/2, conf .85,  |gap| .35
    expected = 2 / 6 * 0.05 + 2 / 6 * 0.275 + 2 / 6 * 0.35
    assert expected_calibration_error(PROBS, LABELS, num_bins=4) == pytest.approx(expected, abs=1e-12)
    # With a single bin ECE is |accuracy − mean confidence|.
    assert expected_calibration_error(PROBS, LABELS, num_bins=1) == pytest.approx(abs(4 / 6 - 4.05 / 6), abs=1e-12)


def test_ece_with_fifteen_bins_matches_a_loop_over_bins():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(2 * torch.randn(500, 7, generator=g, dtype=torch.float64), 1)
    labels = torch.randint(0, 7, (500,), generator=g)
    confidence, prediction = probs.max(1)
    ece = 0.0
    for b in range(15):
        members = [i for i in range(500) if b / 15 < confidence[i] <= (b + 1) / 15]
        if members:
            acc = sum(float(prediction[i] == labels[i]) for i in members) / len(members)
            conf = sum(float(confidence[i]) for i in members) / len(members)
            ece += len(members) / 500 * abs(acc - conf)
    assert expected_calibration_error(probs, labels) == pytest.approx(ece, abs=1e-12)


def test_nll_by_hand_for_both_kinds():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    e = math.e
    softmax_nll = (-math.log(e**2 / (e**2 + 2)) - math.log(1 / (e + 2))) / 2
    assert negative_log_likelihood(logits, labels) == pytest.approx(softmax_nll, abs=1e-12)

    def s(v):
        return 1 / (1 + math.exp(-v))

    sigmoid_nll = (-math.log(s(2) / (s(2) + 2 * s(0))) - math.log(s(0) / (2 * s(0) + s(1)))) / 2
    assert negative_log_likelihood(logits, labels, "sigmoid_normalised") == pytest.approx(sigmoid_nll, abs=1e-12)
    # Temperature divides the logits first.
    assert negative_log_likelihood(2 * logits, labels, temperature=2.0) == pytest.approx(softmax_nll, abs=1e-12)


def test_nll_stays_finite_where_the_probability_underflows():
    logits = torch.tensor([[-800.0, 0.0], [800.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert probabilities(logits, "sigmoid_normalised")[0, 0] == 0.0  # exp(−800) underflows float64
    # −log(σ(−800) / (σ(−800) + 1/2)) ≈ 800 − log 2;  −log(1/2 / (1 + 1/2)) = log 3.
    expected = (800 - math.log(2) + math.log(3)) / 2
    assert negative_log_likelihood(logits, labels, "sigmoid_normalised") == pytest.approx(expected, rel=1e-12)
    assert negative_log_likelihood(logits, labels) == pytest.approx(800.0, rel=1e-12)  # softmax: (800 + 800)/2


def test_sigmoid_normalised_probabilities_are_the_normalised_sigmoids():
    logits = torch.randn(40, 9, generator=torch.Generator().manual_seed(1)) * 4
    p = probabilities(logits, "sigmoid_normalised")
    sig = torch.sigmoid(logits.double())
    torch.testing.assert_close(p, sig / sig.sum(1, keepdim=True), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(p.sum(1), torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(probabilities(logits).sum(1), torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-12)


def drawn_at(kind: str, n: int, classes: int = 10, seed: int = 0):
    """Logits z and labels drawn from probabilities(z, kind): a calibrated model."""
    g = torch.Generator().manual_seed(seed)
    z = 1.5 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    labels = torch.multinomial(probabilities(z, kind), 1, generator=g).squeeze(1)
    return z, labels


@pytest.mark.parametrize("kind", ["softmax", "sigmoid_normalised"])
def test_temperature_scaling_recovers_the_temperature_and_lowers_nll(kind):
    z, labels = drawn_at(kind, 20_000)
    holdout, evaluation = slice(0, 10_000), slice(10_000, None)
    overconfident = 5 * z  # a calibrated model's logits, times 5
    result = calibration_statistics(overconfident[holdout], labels[holdout], overconfident[evaluation], labels[evaluation], kind)
    assert set(result) == {"nll", "ece", "nll_tempscaled", "ece_tempscaled", "temperature"}
    assert result["temperature"] == pytest.approx(5.0, rel=0.05)
    assert result["nll_tempscaled"] < result["nll"] - 0.5
    assert result["ece_tempscaled"] < 0.02 < result["ece"]
    # The fitted T is a minimum of the hold-out NLL.
    t = result["temperature"]
    nll = [negative_log_likelihood(overconfident[holdout], labels[holdout], kind, t * f) for f in (0.99, 1, 1.01)]
    assert nll[1] < min(nll[0], nll[2])


def test_an_underconfident_model_gets_a_temperature_below_one():
    z, labels = drawn_at("softmax", 10_000, seed=1)
    assert fit_temperature(z / 3, labels) == pytest.approx(1 / 3, rel=0.05)


def test_the_temperature_is_fitted_alike_under_no_grad_and_from_inference_tensors():
    """Measurements call it under torch.no_grad on logits a validation pass made under torch.inference_mode."""
    z, labels = drawn_at("softmax", 2_000, seed=2)
    expected = fit_temperature(3 * z, labels)
    with torch.inference_mode():
        made_in_inference = 3 * z
    with torch.no_grad():
        assert fit_temperature(made_in_inference, labels) == expected


def nll_in_numpy(z: np.ndarray, labels: np.ndarray, kind: str, log_t: float) -> float:
    """The mean NLL at T = exp(log_t) by scipy's log-softmax and log-sigmoid: no code shared with calibration."""
    w = z * math.exp(-log_t)
    log_p = log_softmax(w, 1) if kind == "softmax" else log_expit(w) - logsumexp(log_expit(w), 1, keepdims=True)
    return float(-log_p[np.arange(len(labels)), labels].mean())


@pytest.mark.parametrize("kind", ["softmax", "sigmoid_normalised"])
@pytest.mark.parametrize("scale, label_noise", [
    (5.0, 0.0),   # overconfident: T ≈ 5
    (0.01, 0.5),  # underconfident with noisy labels: the NLL is concave in log T between T = 1 and its
                  # minimum (an Armijo-only L-BFGS crawls there and stops far short)
])
def test_fitted_temperature_is_the_minimum_a_grid_and_brent_find(kind, scale, label_noise):
    z, labels = drawn_at(kind, 2_000, seed=2)
    flip = torch.rand(len(labels), generator=torch.Generator().manual_seed(3)) < label_noise
    labels[flip] = torch.randint(0, z.shape[1], (int(flip.sum()),), generator=torch.Generator().manual_seed(4))
    z = scale * z
    # Independently: the best of a dense grid over log T in [-8, 8], refined by Brent's method between its neighbours.
    z_np, y_np = z.numpy(), labels.numpy()
    grid = np.linspace(-8, 8, 1601)
    i = int(np.argmin([nll_in_numpy(z_np, y_np, kind, u) for u in grid]))
    assert 0 < i < len(grid) - 1
    brent = minimize_scalar(lambda u: nll_in_numpy(z_np, y_np, kind, u), bounds=(grid[i - 1], grid[i + 1]),
                            method="bounded", options={"xatol": 1e-12})
    assert fit_temperature(z, labels, kind) == pytest.approx(math.exp(brent.x), rel=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: negative_log_likelihood(torch.zeros(3, 4), torch.tensor([0, 1, 4])), r"labels must lie in \[0, 4\)"),
    (lambda: negative_log_likelihood(torch.zeros(3, 4), torch.tensor([0, -1, 2])), r"labels must lie in \[0, 4\)"),
    (lambda: negative_log_likelihood(torch.zeros(3, 4), torch.tensor([0, 1])), "3 rows of logits but labels of shape"),
    (lambda: negative_log_likelihood(torch.zeros(4), torch.tensor([0, 1, 2, 3])), r"logits must be \(N, K\)"),
    (lambda: negative_log_likelihood(torch.zeros(3, 4), torch.tensor([0.0, 1.0, 2.0])), "integer class indices"),
    (lambda: negative_log_likelihood(torch.tensor([[0.0, float("nan")]]), torch.tensor([0])), "NaN or infinite"),
    (lambda: fit_temperature(torch.tensor([[0.0, float("inf")]]), torch.tensor([0])), "NaN or infinite"),
    (lambda: probabilities(torch.zeros(2, 3), "tanh"), "kind must be one of"),
    (lambda: probabilities(torch.zeros(2, 3), temperature=0.0), "temperature must be > 0"),
    (lambda: expected_calibration_error(torch.full((2, 3), 1.5), torch.tensor([0, 1])), r"lie in \[0, 1\]"),
    (lambda: expected_calibration_error(PROBS, LABELS, num_bins=0), "num_bins must be >= 1"),
    (lambda: calibration_statistics(torch.zeros(3, 4), torch.tensor([0, 1, 2]), torch.zeros(2, 5), torch.tensor([0, 9])),
     r"labels must lie in \[0, 5\)"),
])
def test_bad_input_is_refused_with_a_clear_message(call, match):
    with pytest.raises(ValueError, match=match):
        call()
