"""Each objective against an independent computation: explicit sums over classes on small tensors."""

import math

import pytest
import torch
from torch import nn

from lightning_modules.objectives import (
    CosineSoftmax,
    ExtraFinalL2,
    LabelSmoothing,
    LogitNorm,
    LogitPenalty,
    PenultimateDropout,
    Sigmoid,
    Softmax,
    SquaredError,
    make_objective,
    objective_classes,
)

N, M, K = 6, 5, 7


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, M, generator=g, dtype=torch.float64)
    head = nn.Linear(M, K).double()
    with torch.no_grad():
        head.weight.copy_(torch.randn(K, M, generator=g))
        head.bias.copy_(torch.randn(K, generator=g))
    y = torch.randint(0, K, (N,), generator=g)
    return x, head, y


def total(objective, x, head, y):
    logits = objective.logits(x, head)
    return sum(objective.loss_terms(logits, y, head).values())


def log_softmax_by_hand(z):
    """log p_k = z_k - log sum_j exp(z_j), one example at a time, with explicit loops."""
    out = []
    for row in z.tolist() if torch.is_tensor(z) else z:
        lse = math.log(sum(math.exp(v) for v in row))
        out.append([v - lse for v in row])
    return out


def mean_ce_by_hand(z, y):
    logp = log_softmax_by_hand(z)
    return sum(-logp[i][int(y[i])] for i in range(len(logp))) / len(logp)


def test_softmax_is_explicit_cross_entropy(data):
    x, head, y = data
    z = x @ head.weight.T + head.bias
    assert total(Softmax(), x, head, y).item() == pytest.approx(mean_ce_by_hand(z, y), rel=1e-10)


def test_label_smoothing_matches_eq2(data):
    x, head, y = data
    alpha = 0.1
    z = x @ head.weight.T + head.bias
    logp = log_softmax_by_hand(z)
    expected = 0.0
    for i in range(N):
        for k in range(K):
            target = (1 - alpha) * (k == int(y[i])) + alpha / K
            expected += -target * logp[i][k] / (1 - alpha)
    assert total(LabelSmoothing(alpha), x, head, y).item() == pytest.approx(expected / N, rel=1e-10)


def test_label_smoothing_positive_logit_gradient_equals_softmax():
    # Section 2: the 1/(1-alpha) factor keeps d loss / d z_y at softmax's scale, up to the uniform part:
    # d/dz_y = (p_y - 1) for softmax; (p_y - (1-alpha) - alpha/K)/(1-alpha) for label smoothing, which
    # equals softmax's when p is uniform (at initialisation).
    z = torch.zeros(3, K, requires_grad=True)
    y = torch.tensor([0, 3, 6])
    head = nn.Linear(1, K)
    grads = []
    for obj in (Softmax(), LabelSmoothing(0.1)):
        (g,) = torch.autograd.grad(sum(obj.loss_terms(z, y, head).values()), z)
        grads.append(g[torch.arange(3), y])
    torch.testing.assert_close(grads[0], grads[1])


def test_sigmoid_is_sum_of_softplus_minus_target_logit(data):
    x, head, y = data
    z = (x @ head.weight.T + head.bias).tolist()
    expected = 0.0
    for i in range(N):
        for k in range(K):
            expected += math.log1p(math.exp(z[i][k])) - (k == int(y[i])) * z[i][k]
    assert total(Sigmoid(), x, head, y).item() == pytest.approx(expected / N, rel=1e-10)


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_sigmoid_initial_probabilities_are_about_one_over_k(variant):
    num_classes = 1000
    head = nn.Linear(64, num_classes)
    obj = Sigmoid(variant)
    obj.init_head(head)
    probs = torch.sigmoid(obj.logits(torch.randn(32, 64), head))
    assert probs.mean().item() == pytest.approx(1 / num_classes, rel=0.05)
    assert (head.bias == 0).all() if variant == "released" else torch.allclose(head.bias, torch.full((num_classes,), -math.log(num_classes)))


def test_logit_penalty_adds_half_beta_squared_norm(data):
    x, head, y = data
    beta = 0.3
    z = x @ head.weight.T + head.bias
    penalty = sum(0.5 * beta * sum(v * v for v in row) for row in z.tolist()) / N
    terms = LogitPenalty(beta).loss_terms(z, y, head)
    assert terms["logit_penalty"].item() == pytest.approx(penalty, rel=1e-10)
    assert terms["cross_entropy"].item() == pytest.approx(mean_ce_by_hand(z, y), rel=1e-10)


def test_logit_norm_matches_eq6_and_is_scale_invariant(data):
    x, head, y = data
    tau = 0.04
    z = x @ head.weight.T + head.bias
    normed = [[v / (tau * math.sqrt(sum(u * u for u in row))) for v in row] for row in z.tolist()]
    expected = mean_ce_by_hand(normed, y)
    obj = LogitNorm(tau)
    assert total(obj, x, head, y).item() == pytest.approx(expected, rel=1e-10)
    scaled = nn.Linear(M, K).double()
    with torch.no_grad():  # z -> 3.7 z by scaling W and b together
        scaled.weight.copy_(3.7 * head.weight)
        scaled.bias.copy_(3.7 * head.bias)
    assert total(obj, x, scaled, y).item() == pytest.approx(expected, rel=1e-10)


def test_cosine_softmax_matches_eq7_and_is_scale_invariant(data):
    x, head, y = data
    tau = 0.05
    W, b = head.weight.tolist(), head.bias.tolist()
    s = []
    for xi in x.tolist():
        row = []
        for k in range(K):
            dot = sum(W[k][j] * xi[j] for j in range(M))
            cos = dot / (math.sqrt(sum(w * w for w in W[k])) * math.sqrt(sum(v * v for v in xi)))
            row.append(cos / tau + b[k])
        s.append(row)
    expected = mean_ce_by_hand(s, y)
    obj = CosineSoftmax(tau)
    assert total(obj, x, head, y).item() == pytest.approx(expected, rel=1e-10)
    # Invariant to scaling each feature vector and each class weight row by positive factors.
    rescaled = nn.Linear(M, K).double()
    with torch.no_grad():
        rescaled.weight.copy_(head.weight * torch.rand(K, 1, dtype=torch.float64).add(0.5))
        rescaled.bias.copy_(head.bias)
    x_scaled = x * torch.rand(N, 1, dtype=torch.float64).add(0.1) * 10
    assert total(obj, x_scaled, rescaled, y).item() == pytest.approx(expected, rel=1e-10)
    # loss_scale multiplies the loss (the paper sets it to tau for tau < 0.05).
    assert total(CosineSoftmax(tau, loss_scale=tau), x, head, y).item() == pytest.approx(tau * expected, rel=1e-10)


def test_cosine_softmax_released_variant(data):
    x, head, y = data
    tau = 0.05
    w_hat = head.weight / head.weight.norm(dim=1, keepdim=True)
    s = (x @ w_hat.T + head.bias) / tau  # weights normalised, features not, bias divided by tau too
    assert total(CosineSoftmax(tau, variant="released"), x, head, y).item() == pytest.approx(mean_ce_by_hand(s, y), rel=1e-10)


@pytest.mark.parametrize("variant", ["paper", "released"])
def test_squared_error_matches_eq9(data, variant):
    x, head, y = data
    kappa, m, scale = 9.0, 60.0, 10.0
    z = (x @ head.weight.T + head.bias).tolist()
    expected = 0.0
    for i in range(N):
        per = 0.0
        for k in range(K):
            t = float(k == int(y[i]))
            per += kappa * t * (z[i][k] - m) ** 2 + (1 - t) * z[i][k] ** 2
        expected += scale * (per / K if variant == "paper" else per)
    assert total(SquaredError(kappa, m, scale, variant), x, head, y).item() == pytest.approx(expected / N, rel=1e-10)


def test_dropout_only_in_training(data):
    x, head, y = data
    obj = PenultimateDropout(keep_prob=0.5)
    obj.eval()
    torch.testing.assert_close(obj.logits(x, head), head(x))
    obj.train()
    torch.manual_seed(0)
    z = obj.logits(x, head)
    assert not torch.allclose(z, head(x))
    # Each feature is either dropped or scaled by 1/rho: reconstruct the mask and check the logits.
    torch.manual_seed(0)
    mask = torch.nn.functional.dropout(torch.ones_like(x), p=0.5, training=True)
    assert set(mask.unique().tolist()) <= {0.0, 2.0}
    torch.testing.assert_close(z, head(x * mask))


def test_dropout_stacks_with_label_smoothing(data):
    x, head, y = data
    obj = PenultimateDropout(keep_prob=1.0, loss=LabelSmoothing(0.1))
    assert total(obj, x, head, y).item() == pytest.approx(total(LabelSmoothing(0.1), x, head, y).item(), rel=1e-12)


def test_extra_final_l2_touches_only_the_head_weight(data):
    x, head, y = data
    lam = 0.05
    obj = ExtraFinalL2(lambda_final=lam)
    features = nn.Linear(M, M).double()  # stands for the backbone
    terms = obj.loss_terms(obj.logits(features(x), head), y, head)
    expected = 0.5 * lam * sum(w * w for row in head.weight.tolist() for w in row)
    assert terms["final_layer_l2"].item() == pytest.approx(expected, rel=1e-10)
    params = [head.weight, head.bias, *features.parameters()]
    grads = torch.autograd.grad(terms["final_layer_l2"], params, allow_unused=True)
    torch.testing.assert_close(grads[0], lam * head.weight)  # exactly weight decay lambda on W
    assert all(g is None or (g == 0).all() for g in grads[1:])


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LabelSmoothing(alpha=1.0), "alpha must be in \\[0, 1\\)"),
        (lambda: LabelSmoothing(alpha=-0.1), "alpha must be in \\[0, 1\\)"),
        (lambda: PenultimateDropout(keep_prob=0.0), "keep_prob must be in \\(0, 1\\]"),
        (lambda: PenultimateDropout(keep_prob=1.5), "keep_prob must be in \\(0, 1\\]"),
        (lambda: LogitPenalty(beta=-1e-4), "beta must be >= 0"),
        (lambda: ExtraFinalL2(lambda_final=-1.0), "lambda_final must be >= 0"),
        (lambda: LogitNorm(temperature=0.0), "temperature must be > 0"),
        (lambda: CosineSoftmax(temperature=-0.05), "temperature must be > 0"),
        (lambda: SquaredError(kappa=0), "kappa must be > 0"),
        (lambda: SquaredError(loss_scale=-1), "loss_scale must be > 0"),
    ],
)
def test_invalid_hyper_parameters_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_unknown_objective_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown objective 'Softmx'. Valid objectives: Softmax, .*CosineSoftmax"):
        make_objective("Softmx")
    assert isinstance(make_objective("LogitNorm"), LogitNorm)


def test_all_nine_objectives_are_registered():
    assert set(objective_classes()) == {
        "Softmax", "LabelSmoothing", "Sigmoid", "ExtraFinalL2", "PenultimateDropout",
        "LogitPenalty", "LogitNorm", "CosineSoftmax", "SquaredError",
    }


def test_measurements_see_the_class_weights_and_probabilities_each_objective_uses():
    head = torch.nn.Linear(4, 3)
    torch.nn.init.normal_(head.weight, std=3.0)
    cosine = PenultimateDropout(loss=CosineSoftmax())  # a wrapper answers for the loss it wraps
    assert torch.allclose(cosine.class_weights(head).norm(dim=1), torch.ones(3))
    assert Softmax().class_weights(head) is head.weight
    assert PenultimateDropout(loss=Sigmoid()).probability_kind == "sigmoid_normalised"
    assert LabelSmoothing().probability_kind == "softmax"


PATH = "lightning_modules.objectives."
# Each of the nine objectives with every argument away from its default (wrapped losses too), and the
# record expected of it, written out by hand.
CONSTRUCTED = [
    (lambda: Softmax(), {}),
    (lambda: LabelSmoothing(0.3), {"alpha": 0.3}),  # positional
    (lambda: Sigmoid(variant="released"), {"variant": "released"}),
    (lambda: LogitPenalty(beta=0.05), {"beta": 0.05}),
    (lambda: LogitNorm(temperature=0.5), {"temperature": 0.5}),
    (lambda: CosineSoftmax(0.2, loss_scale=0.5, variant="released"),
     {"temperature": 0.2, "loss_scale": 0.5, "variant": "released"}),
    (lambda: SquaredError(kappa=2.0, m=3.0, loss_scale=0.7, variant="released"),
     {"kappa": 2.0, "m": 3.0, "loss_scale": 0.7, "variant": "released"}),
    (lambda: PenultimateDropout(keep_prob=0.5, loss=LabelSmoothing(alpha=0.2)),
     {"keep_prob": 0.5, "loss": {"class_path": PATH + "LabelSmoothing", "init_args": {"alpha": 0.2}}}),
    (lambda: ExtraFinalL2(0.3, CosineSoftmax(temperature=0.1, variant="released")),
     {"lambda_final": 0.3, "loss": {"class_path": PATH + "CosineSoftmax",
                                    "init_args": {"temperature": 0.1, "loss_scale": 1.0, "variant": "released"}}}),
]


def test_every_objective_is_constructed_away_from_its_defaults_below():
    assert {type(make()).__name__ for make, _ in CONSTRUCTED} == set(objective_classes())


@pytest.mark.parametrize("make, init_args", CONSTRUCTED, ids=[type(make()).__name__ for make, _ in CONSTRUCTED])
def test_the_record_is_the_constructor_arguments_and_rebuilds_the_same_loss(make, init_args, data):
    x, head, y = data
    objective = make()
    assert objective.config() == {"class_path": PATH + type(objective).__name__, "init_args": init_args}
    rebuilt = make_objective(objective.config())
    assert rebuilt.config() == objective.config()
    for training in (False, True):  # in training, dropout draws the same mask from the same seed
        objective.train(training), rebuilt.train(training)
        torch.manual_seed(0)
        expected = total(objective, x, head, y)
        torch.manual_seed(0)
        assert total(rebuilt, x, head, y).item() == pytest.approx(expected.item(), rel=1e-12)


def test_the_record_includes_defaults_and_names_the_default_loss():
    softmax = {"class_path": PATH + "Softmax", "init_args": {}}
    assert ExtraFinalL2().config()["init_args"] == {"lambda_final": 8e-4, "loss": softmax}
    assert PenultimateDropout(loss=None).config()["init_args"] == {"keep_prob": 0.7, "loss": softmax}
    assert CosineSoftmax(temperature=0.1).config()["init_args"] == {"temperature": 0.1, "loss_scale": 1.0,
                                                                    "variant": "paper"}
    objective = LogitNorm()
    objective.config()["init_args"]["temperature"] = 1.0  # a caller's copy: the record stays as constructed
    assert objective.config()["init_args"] == {"temperature": 0.04}
