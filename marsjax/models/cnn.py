"""The paper's MNIST network (backdoors101 ``SimpleNet``), optionally with BatchNorm.

``conv(20, 5x5) -> [BN] -> ReLU -> maxpool 2 -> conv(50, 5x5) -> [BN] -> ReLU -> maxpool 2 ->
fc 500 -> ReLU -> fc num_classes``. The official network has no BatchNorm, so the official CBE
finds no layer to score on it (mars_spec §2.2, §6.6); ``batch_norm=True`` adds one after each conv,
which is how marsjax runs MARS on MNIST-like data. ``features``/``hidden``/``kernel_size``/``padding``
shrink it for small images (the 8x8 ``digits`` preset uses 3x3 SAME convolutions).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from marsjax.models.layers import Conv, max_pool

__all__ = ["MLP", "SimpleNet"]


class SimpleNet(nn.Module):
    num_classes: int = 10
    features: Sequence[int] = (20, 50)
    hidden: int = 500
    kernel_size: int = 5
    padding: str = "VALID"
    batch_norm: bool = False
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        k = (self.kernel_size, self.kernel_size)
        for i, f in enumerate(self.features):
            x = Conv(
                f,
                k,
                padding=self.padding,
                use_bias=not self.batch_norm,
                impl=self.conv_impl,
                name=f"conv{i + 1}",
            )(x)
            if self.batch_norm:
                x = nn.BatchNorm(
                    use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{i + 1}"
                )(x)
            x = nn.relu(x)
            x = max_pool(x, 2)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        return nn.Dense(self.num_classes, name="fc2")(x)


class MLP(nn.Module):
    """A small fully connected network (tests, quick experiments)."""

    num_classes: int = 10
    hidden: Sequence[int] = (64,)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(h, name=f"fc{i + 1}")(x))
        return nn.Dense(self.num_classes, name=f"fc{len(self.hidden) + 1}")(x)
