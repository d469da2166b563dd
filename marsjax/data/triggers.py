"""Backdoor triggers stamped on uint8 images.

The paper's pixel pattern (backdoors101 ``PatternSynthesizer``) is the 5x3 block::

    [[1, 0, 1],
     [-, 1, -],
     [-, -, 0],
     [-, 1, -],
     [1, 0, 1]]        # "-" = pixel left unchanged

put at rows 3..7, columns 23..25 of a 32x32 (or 28x28) image on every channel; 1 is a white pixel,
0 a black one (the official code normalises the stamped image afterwards, as we do on the device).
On images too small for that position (8x8 digits) it goes one pixel from the top-right corner.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["PATTERN", "Trigger", "apply_trigger", "pattern_trigger", "poison_batch"]

PATTERN = np.array(
    [[1, 0, 1], [-10, 1, -10], [-10, -10, 0], [-10, 1, -10], [1, 0, 1]], dtype=np.int32
)


class Trigger(NamedTuple):
    """A fixed trigger: ``mask`` ``[H, W, 1]`` bool where it applies, ``value`` ``[H, W, 1]`` uint8."""

    mask: np.ndarray
    value: np.ndarray


def pattern_trigger(
    image_shape: tuple[int, int, int], top: int | None = None, left: int | None = None
) -> Trigger:
    """The paper's 5x3 pattern for images of ``image_shape`` (H, W, C)."""
    h, w = image_shape[0], image_shape[1]
    ph, pw = PATTERN.shape
    if top is None or left is None:
        if h >= 28 and w >= 28:
            top, left = 3, 23
        else:
            top, left = 1, w - pw - 1
    if top < 0 or left < 0 or top + ph > h or left + pw > w:
        raise ValueError(f"a {ph}x{pw} pattern at ({top}, {left}) does not fit a {h}x{w} image")
    mask = np.zeros((h, w, 1), bool)
    value = np.zeros((h, w, 1), np.uint8)
    block = PATTERN >= 0
    mask[top : top + ph, left : left + pw, 0] = block
    value[top : top + ph, left : left + pw, 0] = np.where(PATTERN == 1, 255, 0)
    return Trigger(mask, value)


def apply_trigger(x: jax.Array, trigger: Trigger) -> jax.Array:
    """Stamps ``trigger`` on ``x`` (``[..., H, W, C]`` uint8)."""
    return jnp.where(jnp.asarray(trigger.mask), jnp.asarray(trigger.value, x.dtype), x)


def poison_batch(
    x: jax.Array, y: jax.Array, trigger: Trigger, target: int, fraction: float
) -> tuple[jax.Array, jax.Array]:
    """Stamps the trigger on the first ``floor(fraction * B)`` samples and relabels them ``target``.

    This is the official code's scheme (``poisoning_proportion`` of every batch, the first ones).
    """
    b = x.shape[0]
    k = int(np.floor(fraction * b))
    hit = jnp.arange(b) < k
    xs = jnp.where(hit[:, None, None, None], apply_trigger(x, trigger), x)
    ys = jnp.where(hit, jnp.asarray(target, y.dtype), y)
    return xs, ys
