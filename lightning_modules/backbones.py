"""Backbones: any torchvision or timm classification network, with its classifier removed.

``build_backbone`` returns the network that maps images to penultimate features (after global pooling)
and the feature width. ``residual_blocks`` names the per-block outputs that the measurements hook
(class separation and ReLU sparsity per block, Figures 3 and 4).
"""

from __future__ import annotations

import timm
import torchvision
from torch import nn

__all__ = ["build_backbone", "residual_blocks"]


def _zero_init_last_bn(net: nn.Module) -> None:
    """Goyal et al.: the last batch-norm gamma of every residual block starts at 0 (appendix A.1)."""
    for module in net.modules():
        if isinstance(module, torchvision.models.resnet.Bottleneck):
            nn.init.zeros_(module.bn3.weight)
        elif isinstance(module, torchvision.models.resnet.BasicBlock):
            nn.init.zeros_(module.bn2.weight)


def _strip_last_linear(net: nn.Module) -> int:
    """Replace a torchvision model's final nn.Linear with Identity; return its input width."""
    last_name, last = None, None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None:
        raise ValueError(f"{type(net).__name__} has no nn.Linear classifier to replace with the objective's head.")
    parent = net.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else net
    setattr(parent, last_name.rpartition(".")[2], nn.Identity())
    return last.in_features


def build_backbone(name: str, source: str = "torchvision", zero_init_last_bn: bool = True) -> tuple[nn.Module, int]:
    """Build ``name`` from ``source`` ("torchvision" or "timm"), randomly initialised, without its classifier.

    Returns ``(network, feature_width)``; the network maps images to pooled penultimate features.
    """
    if source == "torchvision":
        available = torchvision.models.list_models(module=torchvision.models)
        if name not in available:
            raise ValueError(
                f"Unknown torchvision backbone {name!r}. Choose one of torchvision.models.list_models() "
                f"(e.g. resnet50, resnet18, wide_resnet50_2) or set backbone_source='timm'."
            )
        net = torchvision.models.get_model(name, weights=None)
        width = _strip_last_linear(net)
        if zero_init_last_bn:
            _zero_init_last_bn(net)
    elif source == "timm":
        if not timm.is_model(name):
            raise ValueError(
                f"Unknown timm backbone {name!r}. Choose one of timm.list_models() "
                f"(e.g. resnet50, resnet10t, inception_v3) or set backbone_source='torchvision'."
            )
        # timm ResNets zero-initialise the last BN of each block themselves (zero_init_last=True).
        net = timm.create_model(name, pretrained=False, num_classes=0)
        width = net.num_features
    else:
        raise ValueError(f"backbone_source must be 'torchvision' or 'timm', got {source!r}.")
    return net, width


def residual_blocks(net: nn.Module) -> dict[str, nn.Module]:
    """The network's blocks in forward order, by qualified name: ResNet ``layerX.i`` (torchvision and
    timm), Inception v3's ``Mixed_5b`` ... ``Mixed_7c`` (appendix B; each the concatenation of its branches'
    ReLU outputs), timm ``stages.i.blocks.j``, or the children of a ``features`` sequential (VGG, EfficientNet)."""
    mixed = {name: child for name, child in net.named_children() if name.startswith("Mixed_")}
    if mixed:
        return mixed
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)):
        return {f"layer{i}.{j}": block for i in range(1, 5) for j, block in enumerate(getattr(net, f"layer{i}"))}
    if hasattr(net, "stages"):
        blocks = {}
        for i, stage in enumerate(net.stages):
            inner = getattr(stage, "blocks", stage)
            blocks.update({f"stages.{i}.{j}": block for j, block in enumerate(inner)})
        return blocks
    if isinstance(getattr(net, "features", None), nn.Sequential):
        return {f"features.{i}": block for i, block in enumerate(net.features)}
    if isinstance(getattr(net, "blocks", None), nn.Sequential):  # timm vision transformers
        return {f"blocks.{i}": block for i, block in enumerate(net.blocks)}
    raise ValueError(f"Don't know the blocks of {type(net).__name__}; add its layout to residual_blocks().")

