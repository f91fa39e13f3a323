"""The weight-space mathematics of Neyshabur et al. against brute force: interpolation, barrier, parameter
distance, batch-norm recomputation, module criticality; and block shuffling of images."""

import copy
import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.optim.swa_utils import update_bn

from datamodules import block_permutation, shuffle_blocks
from datamodules.beton import WriterSettings
from datamodules.convert import folder
from measurements.weight_space import interpolate, loss_barrier, module_criticality, negative_variance, parameter_distance, perturb
from study.criticality import Criticality
from study.passes import LossSums
from study.spec import StudyError, check_grid, check_lambdas
from tests.helpers import ffcv_datamodule
from tests.test_data import folder_datamodule


def bn_net(seed):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    net(torch.randn(2, 3, 6, 6))
    net.train()
    for _ in range(3):  # running moments and a counter of their own
        net(torch.randn(5, 3, 6, 6) * (seed + 1))
    return net


def test_interpolation_reproduces_both_ends_bit_for_bit_and_never_interpolates_the_counter():
    a, b = bn_net(0).state_dict(), bn_net(1).state_dict()
    b["1.num_batches_tracked"] = torch.tensor(99)
    for lam, end in ((0.0, a), (1.0, b)):
        path = interpolate(a, b, lam)
        for key in a:
            if key.endswith("num_batches_tracked"):
                assert path[key] == a[key]  # a counter, taken from the first network
            else:
                assert torch.equal(path[key], end[key]), key
    middle = interpolate(a, b, 0.3)
    torch.testing.assert_close(middle["0.weight"], 0.7 * a["0.weight"] + 0.3 * b["0.weight"])
    torch.testing.assert_close(interpolate(a, b, 2.0)["0.weight"], 2 * b["0.weight"] - a["0.weight"])  # extrapolated
    with pytest.raises(ValueError, match="one architecture"):
        interpolate(a, {k: v for k, v in b.items() if k != "0.bias"}, 0.5)


def test_a_network_is_undefined_where_an_extrapolated_variance_is_negative():
    a, b = bn_net(0).state_dict(), bn_net(1).state_dict()
    var_a, var_b = a["1.running_var"].double().numpy(), b["1.running_var"].double().numpy()
    found = []
    for lam in np.linspace(-3, 4, 29):
        brute = any((1 - lam) * x + lam * y < 0 for x, y in zip(var_a, var_b))
        found.append(negative_variance(interpolate(a, b, lam)))
        assert found[-1] == brute, lam
        assert not (0 <= lam <= 1 and brute)
    assert True in found and False in found
    assert not negative_variance({"0.weight": -torch.ones(3)})  # only variances count


def test_barrier_is_the_largest_rise_above_the_chord():
    lams = [-0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5]
    values = [9.0, 1.0, 2.5, 4.0, 2.0, 3.0, 9.0]
    brute = max(v - ((1 - l) * 1.0 + l * 3.0) for l, v in zip(lams, values) if 0 <= l <= 1)
    assert loss_barrier(lams, values) == pytest.approx(brute) == pytest.approx(2.0)
    assert loss_barrier(lams[1:-1], [1 + 2 * l for l in lams[1:-1]]) == pytest.approx(0.0)  # a straight path
    with pytest.raises(ValueError, match="lam = 0 and lam = 1"):
        loss_barrier([0.0, 0.5], [1.0, 2.0])


def test_parameter_distance_whole_and_per_module():
    a, b = dict(bn_net(0).named_parameters()), dict(bn_net(1).named_parameters())
    parts = {"conv": ["0.weight", "0.bias"], "rest": ["1.weight", "1.bias", "4.weight", "4.bias"]}
    d = parameter_distance(a, b, parts)
    flat = lambda net, names: torch.cat([net[n].detach().flatten() for n in names])  # noqa: E731
    assert d["conv"] == pytest.approx(float(torch.linalg.norm(flat(a, parts["conv"]) - flat(b, parts["conv"]))))
    everything = parts["conv"] + parts["rest"]
    assert d["all"] == pytest.approx(float(torch.linalg.norm(flat(a, everything) - flat(b, everything))), rel=1e-6)


def test_recomputed_batch_norm_moments_are_the_batches_mean_and_variance():
    net = bn_net(0)
    batches = [torch.randn(7, 3, 6, 6) + 2 for _ in range(3)]
    update_bn(batches, net)
    conv = net[0]
    with torch.no_grad():
        outs = [conv(x) for x in batches]  # BN's input
    # momentum=None: the cumulative average of each batch's mean and unbiased variance.
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).flatten(1).var(1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(net[1].running_mean, mean)
    torch.testing.assert_close(net[1].running_var, var)
    assert not net.training or net[1].momentum == 0.1  # the momentum is given back


def test_criticality_matches_a_brute_force_search():
    alphas, sigmas = [0.0, 0.5, 1.0], [0.1, 1.0]
    losses = np.array([[3.0, 5.0], [1.005, 2.0], [1.0, 1.2]])
    mu = module_criticality(alphas, sigmas, losses, bound=1.01, distance_sq=4.0)
    brute = min((a / s) ** 2 * 4.0 for (i, a), (j, s) in itertools.product(enumerate(alphas), enumerate(sigmas))
                if losses[i, j] <= 1.01)
    assert mu == pytest.approx(brute) == pytest.approx(100.0)  # (0.5 / 0.1)^2 x 4 beats (1 / 0.1)^2 x 4
    assert module_criticality(alphas, sigmas, losses + 10, 1.01, 4.0) is None  # nothing admissible


def test_every_noise_draw_perturbs_every_parameter_of_the_module():
    initial = {"w": torch.zeros(3, 3), "b": torch.zeros(3)}
    final = {"w": torch.ones(3, 3), "b": torch.ones(3)}
    generator = torch.Generator().manual_seed(0)
    draws = [perturb(initial, final, 0.5, {"w": 0.1, "b": 0.1}, generator) for _ in range(3)]
    for draw in draws:
        for name in ("w", "b"):
            noise = draw[name] - 0.5
            assert (noise != 0).all() and 0.02 < noise.std() < 0.3, name
    assert not torch.equal(draws[0]["w"], draws[1]["w"]) and not torch.equal(draws[1]["b"], draws[2]["b"])


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class _Toy(torch.nn.Module):
    """A feature map that training barely moved (``lower``) and a classifier trained from zero (``upper``)."""

    def __init__(self):
        super().__init__()
        self.lower = nn.Linear(2, 2)
        self.upper = nn.Linear(2, 2)

    def forward(self, x):
        return self.upper(self.lower(x))


def test_criticality_tells_a_critical_module_from_one_that_is_not():
    import lightning as L

    torch.manual_seed(0)
    x = torch.randn(400, 2)
    y = (x[:, 0] > 0).long()
    net = _Toy()
    with torch.no_grad():
        net.lower.weight.copy_(torch.eye(2))
        net.lower.bias.zero_()
        net.upper.weight.copy_(torch.tensor([[-8.0, 0.0], [8.0, 0.0]]))
        net.upper.bias.zero_()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    initial["lower.weight"] = torch.eye(2) + 0.05 * torch.randn(2, 2)  # where the lower module started: close
    initial["upper.weight"] = torch.zeros(2, 2)  # the classifier started from nothing
    parts = {"lower": ["lower.weight", "lower.bias"], "upper": ["upper.weight", "upper.bias"]}

    class Data(L.LightningDataModule):
        def val_dataloader(self):
            return [torch.utils.data.DataLoader(_Pairs(x, y), batch_size=100)] * 2

    module = Criticality(net, initial, parts, alphas=[0.0, 0.25, 0.5, 0.75, 1.0], sigmas=[0.01, 0.03, 0.1, 0.3],
                         num_classes=2, draws=3, admissible="loss")
    L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False).validate(module, datamodule=Data(), verbose=False)
    result = module.results["modules"]
    lower, upper = result["lower"]["criticality"], result["upper"]["criticality"]
    assert lower is not None and upper is not None and lower < upper / 10, (lower, upper)
    assert result["upper"]["rewound_test_error"] == pytest.approx(0.5, abs=0.1)  # zero classifier: chance
    assert result["lower"]["rewound_test_error"] < 0.05
    draws = np.array(result["upper"]["loss_draws"])
    assert (draws.std(axis=2)[:, 1:] > 0).all()  # the draws of a point differ: each perturbed the module
    assert module.results["network_criticality"] == pytest.approx(lower + upper)


def test_empty_or_invalid_grids_are_refused_before_any_pass():
    with pytest.raises(StudyError, match="lambda grid is empty"):
        check_lambdas([])
    with pytest.raises(StudyError, match="must hold 0 and 1"):
        check_lambdas([0.0, 0.5])
    with pytest.raises(StudyError, match="sigma grid"):
        check_grid([0.5, 1.0], [], 3)
    with pytest.raises(StudyError, match="alpha grid"):
        check_grid([], [0.1], 3)


def test_loss_sums_are_the_mean_cross_entropy_and_error():
    sums = LossSums(points=1, num_classes=3)
    logits, labels = torch.randn(10, 3), torch.randint(0, 3, (10,))
    sums.update(0, 0, logits[:6], labels[:6])
    sums.update(0, 0, logits[6:], labels[6:])
    loss, error = sums.compute()
    assert float(loss[0, 0]) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    assert float(error[0, 0]) == pytest.approx(float((logits.argmax(1) != labels).double().mean()))


# --- block shuffle ---

def test_a_known_permutation_of_blocks_gives_the_expected_pixels():
    image = torch.arange(16.0).view(1, 1, 4, 4)  # blocks of 2: [0 1 4 5], [2 3 6 7], [8 9 12 13], [10 11 14 15]
    out = shuffle_blocks(image, 2, torch.tensor([3, 2, 1, 0]))
    assert out[0, 0].tolist() == [[10, 11, 8, 9], [14, 15, 12, 13], [2, 3, 0, 1], [6, 7, 4, 5]]
    assert torch.equal(shuffle_blocks(image, 4, block_permutation(1, 0)), image)  # one block: the identity
    images = torch.randn(5, 3, 8, 8)
    perm = block_permutation(4, seed=3)
    out = shuffle_blocks(images, 2, perm)
    for i in range(5):  # the same permutation for every image
        assert torch.equal(out[i:i + 1], shuffle_blocks(images[i:i + 1], 2, perm))
    assert torch.equal(block_permutation(4, 3), perm) and not torch.equal(block_permutation(4, 4), perm)


def test_ffcv_and_folder_modules_shuffle_the_same_blocks_for_train_and_test(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(2):  # exactly the evaluation size: both pipelines leave the pixels as they are
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "tree" / cls / f"{i}.png")
    beton = folder(str(tmp_path / "tree"), str(tmp_path / "tree.beton"),
                   WriterSettings(write_mode="raw", max_resolution=None, num_workers=1))
    plain = ffcv_datamodule(beton, global_batch_size=4)
    plain.setup("validate")
    reference, _ = plain.on_after_batch_transfer(next(iter(plain.val_dataloader())), 0)
    expected = shuffle_blocks(reference, 8, block_permutation(4, seed=5))
    for data in (ffcv_datamodule(beton, global_batch_size=4, block_shuffle=8, seed=5),
                 folder_datamodule(tmp_path / "tree", val_resize=32, block_shuffle=8, seed=5)):
        data.setup("validate")
        val, _ = data.on_after_batch_transfer(next(iter(data.val_dataloader())), 0)
        torch.testing.assert_close(val, expected, atol=1e-5, rtol=0)
        train = data.evaluation_dataloader("train", np.arange(4))  # what the training split is shuffled with
        images, _ = data.on_after_batch_transfer(next(iter(train)), 0)
        torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


def test_a_block_size_that_does_not_divide_the_image_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"block_shuffle=5 does not divide the image size \[32\]; choose one of \[1, 2, 4, 8, 16, 32\]"):
        ffcv_datamodule(tmp_path / "x.beton", block_shuffle=5)


# --- criticality in the definition's units, per tensor, admissible by the 0-1 error ---

def _bn_classifier(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 3))
    x = torch.randn(240, 3, 6, 6)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0.3).long()
    net.train()
    with torch.no_grad():
        net(x)  # batch-norm moments of the data
    net.eval()
    return net, x, y


def _criticality(net, initial, x, y, parts, **options):
    import lightning as L

    class Data(L.LightningDataModule):
        def val_dataloader(self):
            return [torch.utils.data.DataLoader(_Pairs(x, y), batch_size=80)] * 2

    module = Criticality(net, initial, parts, alphas=[0.0, 0.5, 0.8, 1.0], sigmas=[0.05, 0.2, 0.5, 1.0], num_classes=3,
                         draws=3, **options)
    L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False).validate(module, datamodule=Data(), verbose=False)
    return module


def test_rescaling_a_module_behind_batch_norm_leaves_its_criticality_unchanged():
    net, x, y = _bn_classifier()
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    initial["0.weight"] = initial["0.weight"] + 0.3 * torch.randn_like(initial["0.weight"])
    parts = {"conv": ["0.weight", "1.weight", "1.bias"], "head": ["4.weight", "4.bias"]}
    before = _criticality(net, initial, x, y, parts).results["modules"]["conv"]
    c = 10.0  # the convolution's weights, initial and final, times c; batch norm's moments follow: the same function
    scaled = copy.deepcopy(net)
    with torch.no_grad():
        scaled[0].weight.mul_(c)
        scaled[1].running_mean.mul_(c)
        scaled[1].running_var.mul_(c * c)
    scaled_initial = {**initial, "0.weight": initial["0.weight"] * c}
    after = _criticality(scaled, scaled_initial, x, y, parts).results["modules"]["conv"]
    np.testing.assert_allclose(after["error"], before["error"], atol=1 / 240)
    assert after["distance_sq"] == pytest.approx(c * c * before["distance_sq"], rel=1e-6)  # the raw distance moved
    assert before["criticality"] is not None
    assert after["criticality"] == pytest.approx(before["criticality"], rel=1e-6)  # mu did not


def test_each_tensor_gets_noise_scaled_to_its_own_norm():
    net, x, y = _bn_classifier()
    with torch.no_grad():
        net[1].weight.fill_(50.0)  # batch norm's gamma far larger than the convolution's weights
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    parts = {"conv": ["0.weight", "1.weight", "1.bias"]}
    module = _criticality(net, initial, x, y, parts)
    final = dict(net.named_parameters())
    point = next(p for p in module.points if p[0] == "conv" and p[1] == len(module.alphas) - 1 and p[2] == 1 and p[3] == 0)
    perturbed = module.overrides(point, torch.device("cpu"))
    sigma = module.sigmas[1]
    for name in ("0.weight", "1.weight"):
        rms = float(final[name].pow(2).mean().sqrt())
        noise = (perturbed[name] - final[name]).std()
        assert float(noise) == pytest.approx(sigma * rms, rel=0.35), name
    assert module.scales["conv"]["1.weight"] == pytest.approx(50.0)


def test_a_point_is_admissible_by_the_train_error_within_epsilon_of_the_final_networks():
    net, x, y = _bn_classifier()
    initial = {k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v for k, v in net.state_dict().items()}
    parts = {"conv": ["0.weight", "1.weight", "1.bias"], "head": ["4.weight", "4.bias"]}
    for admissible, epsilon in (("error", 0.05), ("loss", 0.1)):
        module = _criticality(net, initial, x, y, parts, admissible=admissible, epsilon=epsilon)
        results = module.results
        assert results["admissible"] == admissible
        for part, found in results["modules"].items():
            values = np.array(found[admissible])
            bound = (results["final_train_error"] + epsilon if admissible == "error"
                     else (1 + epsilon) * results["final_train_loss"])
            brute = [(a / s) ** 2 * found["scaled_distance_sq"] for i, a in enumerate(module.alphas)
                     for j, s in enumerate(module.sigmas) if values[i, j] <= bound]
            assert found["criticality"] == (pytest.approx(min(brute)) if brute else None), (admissible, part)
    with pytest.raises(StudyError, match="admissible"):
        check_grid([1.0], [0.1], 3, "accuracy")


def test_layers_are_each_convolution_with_its_batch_norm_and_cover_every_parameter_once():
    import timm

    from lightning_modules.classifier import Network

    backbone = timm.create_model("resnet10t", num_classes=0)
    network = Network(backbone, nn.Linear(backbone.num_features, 5))
    layers = network.layers()
    names = [n for group in layers.values() for n in group]
    assert sorted(names) == sorted(n for n, _ in network.named_parameters())  # each parameter once
    convs = [n for n, m in network.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(layers) == len(convs) + 1  # + the head
    assert layers["layer1.0.conv1"] == ["backbone.layer1.0.conv1.weight", "backbone.layer1.0.bn1.weight",
                                        "backbone.layer1.0.bn1.bias"]
    assert layers["head"] == ["head.weight", "head.bias"]


def test_loss_sums_score_the_error_in_the_targets_measure():
    from sklearn.metrics import balanced_accuracy_score

    logits, labels = torch.randn(60, 4), torch.cat([torch.zeros(40, dtype=torch.long), torch.randint(1, 4, (20,))])
    sums = LossSums(points=1, num_classes=4, measure="mean_per_class")
    sums.update(0, 0, logits[:25], labels[:25])
    sums.update(0, 0, logits[25:], labels[25:])
    _, error = sums.compute()
    assert float(error[0, 0]) == pytest.approx(1 - balanced_accuracy_score(labels, logits.argmax(1)))
    assert torch.isnan(error[1, 0])  # a split that read nothing has no error


def test_bootstrap_intervals_of_the_barriers_match_a_loop_over_resamples():
    from measurements.weight_space import bootstrap_barriers

    rng = np.random.default_rng(0)
    lams = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    n = 80
    labels = rng.integers(0, 4, n)
    losses = rng.exponential(1.0, (n, len(lams))) + np.sin(np.pi * lams)
    hits = (rng.random((n, len(lams))) > 0.3 + 0.3 * np.sin(np.pi * lams)).astype(float)
    found = bootstrap_barriers(lams, losses, hits, labels, "mean_per_class", resamples=200, seed=4)
    counts = np.random.default_rng(4).multinomial(n, np.full(n, 1 / n), size=200)
    loss_b, error_b = [], []
    for w in counts:
        chosen = np.repeat(np.arange(n), w)
        loss_b.append(loss_barrier(lams, losses[chosen].mean(0)))
        y = labels[chosen]
        per_class = [hits[chosen][y == c].mean(0) for c in np.unique(y)]
        error_b.append(loss_barrier(lams, 1 - np.mean(per_class, axis=0)))
    np.testing.assert_allclose(found["loss_barrier_interval"], np.percentile(loss_b, [2.5, 97.5]), rtol=1e-10)
    np.testing.assert_allclose(found["error_barrier_interval"], np.percentile(error_b, [2.5, 97.5]), rtol=1e-10)
    low, high = found["loss_barrier_interval"]
    assert low < loss_barrier(lams, losses.mean(0)) < high


def test_block_shuffled_images_train_without_augmentation_by_default(tmp_path):
    from datamodules.image_data import ProgressiveResolution
    from tests.helpers import write_indexed_beton

    path = write_indexed_beton(tmp_path / "d.beton", 16)  # label = index: each image named by its label
    plain = ffcv_datamodule(path, path, global_batch_size=16, crop_scale=(0.2, 0.5))
    shuffled = ffcv_datamodule(path, path, global_batch_size=16, crop_scale=(0.2, 0.5), block_shuffle=8)
    assert plain.augment and not shuffled.augment
    assert ffcv_datamodule(path, path, block_shuffle=8, augment=True).augment  # the authors' default, configurable

    def by_label(loader):
        images, labels = next(iter(loader))
        return {int(label): image for image, label in zip(images, labels.reshape(-1))}

    for data, augmented in ((plain, True), (shuffled, False)):
        data.setup("fit")
        train, val = by_label(data.train_dataloader()), by_label(data.val_dataloader())
        same = [torch.equal(train[k], val[k]) for k in val]
        assert (not any(same)) if augmented else all(same)  # without augmentation: the evaluation crop itself
    with pytest.raises(ValueError, match="progressive_resolution"):
        ffcv_datamodule(path, path, block_shuffle=8, progressive_resolution=ProgressiveResolution(16, 32, 0, 1, 16))


def test_an_analysis_process_shuffles_blocks_with_the_runs_own_seed(tmp_path):
    import yaml

    from study.passes import data_module_of
    from tests.helpers import write_indexed_beton

    path = write_indexed_beton(tmp_path / "d.beton", 8, num_classes=2)
    data = {"class_path": "datamodules.FFCVImageDataModule",
            "init_args": {"train_path": str(path), "val_path": str(path), "image_size": 32, "val_resize": 32,
                          "block_shuffle": 8, "seed": None}}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"seed_everything": 3, "data": data}))
    torch.manual_seed(0)  # this process's own seed must not matter
    found = data_module_of(run)
    assert found.seed == 3
    assert torch.equal(found._permutation(4, torch.device("cpu")), block_permutation(4, 3))
    data["init_args"]["seed"] = 7  # a data seed the run named is kept
    (run / "config.yaml").write_text(yaml.safe_dump({"seed_everything": 3, "data": data}))
    assert data_module_of(run).seed == 7


def test_per_image_rows_are_the_same_whatever_order_the_batches_came_in():
    from study.barriers import PerImage

    torch.manual_seed(0)
    batches = [(s, [torch.randn(5, 3) for _ in range(2)], torch.randint(0, 3, (5,))) for s in (0, 0, 1)]
    tables = []
    for order in ([0, 1, 2], [2, 0, 1]):  # as two processes' batches would be gathered
        metric = PerImage(points=2)
        for k in order:
            metric.update(*batches[k])
        tables.append(metric.compute())
    np.testing.assert_array_equal(*tables)
    split, label, hits, losses = tables[0][:, 0], tables[0][:, 1], tables[0][:, 2:4], tables[0][:, 4:]
    assert (split == 0).sum() == 10 and set(label.tolist()) <= {0, 1, 2}
    logits, labels = torch.cat([b[1][1] for b in batches]), torch.cat([b[2] for b in batches])
    assert losses[:, 1].sum() == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum")))
    assert hits[:, 1].sum() == float((logits.argmax(1) == labels).sum())
    assert PerImage(points=2).compute().shape == (0, 6)  # a process that read nothing
