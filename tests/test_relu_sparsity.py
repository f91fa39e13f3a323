"""ReLU sparsity (Figure 3): counts on known activations, and hooks that count each block once."""

import pytest
import torch
import torchvision

from measurements import NonzeroFraction, relu_nonzero_fraction


def test_fraction_of_nonzero_entries():
    x = torch.tensor([[0.0, 1.0, 0.0, -2.0], [3.0, 0.0, 0.0, 0.0]])
    assert relu_nonzero_fraction(x) == 3 / 8
    metric = NonzeroFraction()
    metric.update(x[:1])
    metric.update(torch.relu(torch.tensor([[1.0, -1.0, 2.0, 0.0, 5.0, 0.0]])))  # batches of other sizes weigh by entries
    assert float(metric.compute()) == pytest.approx((2 + 3) / (4 + 6))


def test_block_output_hooks_see_each_block_once_after_the_residual_relu():
    # torchvision's Bottleneck calls one in-place `relu` module three times; hooking the block's output
    # must see one tensor per block per forward: the post-residual, post-ReLU output.
    net = torchvision.models.resnet50(num_classes=10).eval()
    from lightning_modules.backbones import residual_blocks

    blocks = residual_blocks(net)
    seen = {name: [] for name in blocks}
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: seen[name].append(out.clone()))
               for name, m in blocks.items()]
    with torch.no_grad():
        net(torch.randn(2, 3, 64, 64))
    for h in handles:
        h.remove()
    assert len(blocks) == 16 and all(len(v) == 1 for v in seen.values())
    for name, (out,) in seen.items():
        assert (out >= 0).all(), f"{name}: block output before its ReLU"
        assert 0 < relu_nonzero_fraction(out) < 1
