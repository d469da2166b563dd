"""Models: the paper's SimpleNet (optionally with BatchNorm), ResNet-18, a small MLP."""

from __future__ import annotations

import flax.linen as nn

from marsjax.models.cnn import MLP, SimpleNet
from marsjax.models.layers import CONV_IMPLS, Conv, conv2d, default_conv_impl
from marsjax.models.resnet import ResNet18

__all__ = [
    "CONV_IMPLS",
    "MLP",
    "MODELS",
    "Conv",
    "ResNet18",
    "SimpleNet",
    "build_model",
    "conv2d",
    "default_conv_impl",
]

MODELS = ("simplenet", "resnet18", "mlp")


def build_model(
    name: str,
    num_classes: int,
    *,
    batch_norm: bool = True,
    conv_impl: str = "auto",
    stem: str = "cifar",
    width: str = "paper",
) -> nn.Module:
    """Builds a model by name.

    Args:
      name: one of :data:`MODELS`.
      num_classes: output size.
      batch_norm: SimpleNet only: BatchNorm after each conv (ResNet-18 always has it).
      conv_impl: ``"auto"``, ``"xla"`` or ``"im2col"`` (see :mod:`marsjax.models.layers`).
      stem: ResNet-18 only: ``"cifar"`` or ``"imagenet"``.
      width: SimpleNet only: ``"paper"`` (20/50 channels, 5x5, fc 500: 28x28 inputs) or ``"small"``
        (16/32 channels, 3x3 SAME, fc 64: 8x8 inputs).
    """
    if name == "simplenet":
        if width == "small":
            return SimpleNet(num_classes, (16, 32), 64, 3, "SAME", batch_norm, conv_impl)
        return SimpleNet(num_classes, batch_norm=batch_norm, conv_impl=conv_impl)
    if name == "resnet18":
        return ResNet18(num_classes, stem, conv_impl)
    if name == "mlp":
        return MLP(num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
