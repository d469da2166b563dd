"""ResNet-18 in the torchvision layout, with the CIFAR or the ImageNet stem.

* ``stem="imagenet"``: 7x7 stride-2 conv + 3x3 stride-2 max-pool, as torchvision's ``resnet18``;
  the official MARS code uses it, unchanged, on 32x32 CIFAR-10 images (mars_spec §2.2).
* ``stem="cifar"``: 3x3 stride-1 conv and no max-pool (the CIFAR-100 setup of the paper).

Submodules are created in torchvision's module order (``conv1, bn1, layer1_0{conv1, bn1, conv2,
bn2, downsample_conv, downsample_bn}, ..., fc``), so the parameter dict lists each BatchNorm right
after the convolution it normalises: 20 conv+BN pairs, as backdoor energy expects.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from marsjax.models.layers import Conv

__all__ = ["BasicBlock", "ResNet18"]

_kaiming = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _bn(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    features: int
    stride: int = 1
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = (self.stride, self.stride)
        y = Conv(
            self.features,
            (3, 3),
            s,
            padding=((1, 1), (1, 1)),
            use_bias=False,
            impl=self.conv_impl,
            kernel_init=_kaiming,
            name="conv1",
        )(x)
        y = nn.relu(_bn(train, "bn1")(y))
        y = Conv(
            self.features,
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            impl=self.conv_impl,
            kernel_init=_kaiming,
            name="conv2",
        )(y)
        y = _bn(train, "bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            x = Conv(
                self.features,
                (1, 1),
                s,
                padding="VALID",
                use_bias=False,
                impl=self.conv_impl,
                kernel_init=_kaiming,
                name="downsample_conv",
            )(x)
            x = _bn(train, "downsample_bn")(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    num_classes: int = 10
    stem: str = "cifar"
    conv_impl: str = "auto"
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.stem == "imagenet":
            x = Conv(
                self.widths[0],
                (7, 7),
                (2, 2),
                padding=((3, 3), (3, 3)),
                use_bias=False,
                impl=self.conv_impl,
                kernel_init=_kaiming,
                name="conv1",
            )(x)
            x = nn.relu(_bn(train, "bn1")(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        elif self.stem == "cifar":
            x = Conv(
                self.widths[0],
                (3, 3),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                impl=self.conv_impl,
                kernel_init=_kaiming,
                name="conv1",
            )(x)
            x = nn.relu(_bn(train, "bn1")(x))
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
        for i, w in enumerate(self.widths):
            for j in range(2):
                stride = 2 if (i > 0 and j == 0) else 1
                x = BasicBlock(w, stride, self.conv_impl, name=f"layer{i + 1}_{j}")(x, train)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)
