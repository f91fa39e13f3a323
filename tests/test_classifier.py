import math
"""The recipe of appendix A.1 as ObjectiveClassifier builds it."""


import pytest
import torch
import torchvision

from lightning_modules import CosineSoftmax, ObjectiveClassifier
from lightning_modules.classifier import warmup_exponential_decay


def test_warmup_then_exponential_decay():
    steps = 100  # per epoch
    factors = [warmup_exponential_decay(s, steps, 10, 0.975) for s in range(0, 2000)]
    assert factors[0] == pytest.approx(1 / 1000)
    assert factors[499] == pytest.approx(0.5)
    assert factors[999] == pytest.approx(1.0)  # peak at the end of epoch 10
    assert factors[1000] == 1.0 and factors[1099] == 1.0  # first epoch after warm-up at the peak
    assert factors[1100] == pytest.approx(0.975) and factors[1999] == pytest.approx(0.975 ** 9)


def test_resnet50_recipe_defaults():
    model = ObjectiveClassifier(num_classes=10, global_batch_size=1024)
    net = model.network
    assert isinstance(net.backbone, torchvision.models.ResNet)
    bottlenecks = [m for m in net.backbone.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
    assert len(bottlenecks) == 16 and all((b.bn3.weight == 0).all() for b in bottlenecks)  # zero-init last BN
    assert net.head.weight.std().item() == pytest.approx(0.01, rel=0.1) and (net.head.bias == 0).all()
    assert len(net.blocks()) == 16
    # EMA keeps the paper's horizon in images: 0.9999 per step at 4096 -> 0.9999 ** 0.25 at 1024.
    assert model.ema.decay == pytest.approx(0.9999 ** 0.25)
    assert not any(p.requires_grad for p in model.ema.parameters())


def test_weight_decay_only_on_conv_and_linear_weights():
    model = ObjectiveClassifier(objective=CosineSoftmax(), num_classes=10, global_batch_size=512,
                                backbone="resnet18")

    class _Trainer:
        train_dataloader, num_training_batches, accumulate_grad_batches = [], 10, 1

    model._trainer = _Trainer()  # configure_optimizers reads the steps per epoch
    config = model.configure_optimizers()
    optimizer = config["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 8e-5 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.network.parameters()))
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    assert optimizer.defaults["lr"] == pytest.approx(0.1 * 512 / 256)  # linear scaling: 1.6 at 4096


def test_any_timm_or_torchvision_backbone():
    for name, source in (("resnet10t", "timm"), ("efficientnet_b0", "torchvision")):
        model = ObjectiveClassifier(num_classes=7, global_batch_size=64, backbone=name, backbone_source=source, ema_decay=None)
        model.eval()
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
        assert len(model.network.blocks()) > 3
    with pytest.raises(ValueError, match="Unknown torchvision backbone 'resnet51'"):
        ObjectiveClassifier(num_classes=7, backbone="resnet51")


def _configured(accelerator, **kwargs) -> ObjectiveClassifier:
    from types import SimpleNamespace

    module = ObjectiveClassifier(num_classes=10, backbone="resnet10t", backbone_source="timm", global_batch_size=64, **kwargs)
    module._trainer = SimpleNamespace(accelerator=accelerator)  # what configure_model reads
    module.configure_model()
    return module


def test_gpu_fast_path_keeps_the_network_in_channels_last_and_leaves_the_cpu_path_alone():
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    def convs(module):  # kernels wider than 1x1, whose two layouts differ
        return [p for net in [module.network, module.ema] for p in net.parameters() if p.ndim == 4 and p.shape[-1] > 1]

    gpu, cpu = convs(_configured(CUDAAccelerator())), convs(_configured(CPUAccelerator()))
    assert gpu and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in gpu)
    assert cpu and all(p.is_contiguous() for p in cpu)


def test_compile_is_in_place_so_checkpoints_keep_their_keys():
    from lightning.pytorch.accelerators import CPUAccelerator

    plain, compiled = _configured(CPUAccelerator()), _configured(CPUAccelerator(), compile=True)
    assert compiled.network._compiled_call_impl is not None and plain.network._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())


def test_under_bf16_autocast_the_backbone_runs_in_bf16_and_the_logits_in_float32():
    # Cosine softmax at tau = 0.01 (Table 4's lowest): logits of ~10 here, which bf16 would round by ~0.03.
    module = ObjectiveClassifier(CosineSoftmax(temperature=0.01), num_classes=10, backbone="resnet10t",
                                 backbone_source="timm", ema_decay=None).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = module.network(images)
        logits = module(images)
    assert features.dtype == torch.bfloat16 and logits.dtype == torch.float32
    # Eq. 7 in float64 from the same bf16 features.
    x, w = torch.nn.functional.normalize(features.double(), dim=1), module.network.head.weight.double()
    expected = x @ torch.nn.functional.normalize(w, dim=1).T / 0.01 + module.network.head.bias.double()
    assert expected.abs().max() > 4  # large enough for bf16's rounding to show
    torch.testing.assert_close(logits.double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("precision, accelerator, gpu_has_bf16, expected", [
    (None, "auto", True, "bf16-mixed"),   # a GPU with bf16: the fast path by default
    (None, "gpu", True, "bf16-mixed"),
    (None, "auto", False, "32-true"),     # no GPU (or one without bf16): fp32, as before
    (None, "cpu", True, "32-true"),       # the CPU asked for on a GPU machine
    ("16-mixed", "auto", True, "16-mixed"),  # a config's own choice stands
])
def test_default_precision(precision, accelerator, gpu_has_bf16, expected):
    from cli import default_precision

    assert default_precision(precision, accelerator, gpu_has_bf16) == expected


def test_ema_warmup_is_tensorflows_and_keeps_the_horizon_in_images():
    from lightning_modules.classifier import ema_decay_at

    # tf.train.ExponentialMovingAverage(0.9999, num_updates=t): min(decay, (1 + t) / (10 + t)), t = updates so far.
    assert ema_decay_at(0, 0.9999, "tensorflow") == pytest.approx(2 / 11)
    assert ema_decay_at(99, 0.9999, "tensorflow") == pytest.approx(101 / 110)
    assert ema_decay_at(10**7, 0.9999, "tensorflow") == 0.9999
    assert ema_decay_at(0, 0.9999, "none") == 0.9999
    # At a quarter of the reference batch, t counts reference-batch steps and the momentum is raised to 1/4.
    assert ema_decay_at(3, 0.9999, "tensorflow", 0.25) == pytest.approx((2 / 11) ** 0.25)
    assert ema_decay_at(10**8, 0.9999, "none", 0.25) == pytest.approx(0.9999**0.25)

    # What is left of the initial weights after 8 ImageNet epochs at batch 4096 (312 steps each): the
    # product of the momenta. Without warm-up ~78 % (the number), with it a trace.
    def initial_share(warmup):
        return math.prod(ema_decay_at(t, 0.9999, warmup) for t in range(8 * 312))

    assert initial_share("none") == pytest.approx(0.9999 ** (8 * 312)) and initial_share("none") > 0.77
    assert initial_share("tensorflow") < 1e-3
    with pytest.raises(ValueError, match="ema_warmup must be 'tensorflow' or 'none'"):
        ObjectiveClassifier(num_classes=10, backbone="resnet18", ema_warmup="timm")


def test_a_decay_given_as_lr_times_weight_decay_divides_by_the_actual_peak_lr():
    # Appendix A.3's grid variable: at batch 128 the peak lr is half lr_per_256, so the decay is twice value / lr_per_256.
    model = ObjectiveClassifier(num_classes=10, global_batch_size=128, backbone="resnet18", lr_per_256=0.1,
                                lr_times_weight_decay=1e-5)

    class _Trainer:
        train_dataloader, num_training_batches, accumulate_grad_batches = [], 10, 1

    model._trainer = _Trainer()
    decay, no_decay = model.configure_optimizers()["optimizer"].param_groups
    assert decay["initial_lr"] == pytest.approx(0.05) and decay["weight_decay"] == pytest.approx(1e-5 / 0.05)
    assert no_decay["weight_decay"] == 0.0
