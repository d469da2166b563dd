"""Layers whose implementation is chosen per backend, from measurements.

:class:`Conv` keeps the parameter layout of :class:`flax.linen.Conv` (``kernel``
``[kh, kw, c_in, c_out]``, ``bias`` ``[c_out]``), so code that reads a model's variables (backdoor
energy, checkpoints) does not care which implementation ran, and lets the caller choose how it is
computed. All implementations are the same function (outputs and gradients equal
:func:`jax.lax.conv_general_dilated` to float rounding; ``tests/models/test_layers.py``):

* ``"xla"``: :func:`jax.lax.conv_general_dilated` (cuDNN on GPU). ``vmap`` over clients that each
  hold their own kernel turns it into a grouped convolution.
* ``"im2col"``: patches times the kernel reshaped to ``[kh * kw * c_in, c_out]``: one matrix
  product, which ``vmap`` turns into a batched matrix product. The patches are built in two
  stages: ``kw`` slices along W concatenated on the channel axis, then ``kh`` slices of that along
  H, so ``kw + kh`` wide copies (and as many pads in the backward pass) instead of ``kh * kw``
  thin ones.
* ``"im2col_flat"``: the same patches from ``kh * kw`` slices (the first version, kept for the
  benchmark).
* ``"patches"``: :func:`jax.lax.conv_general_dilated_patches` then one matrix product.
* ``"auto"``: :func:`default_conv_impl` of the default backend.

Measured with ``benchmarks/conv_impl.py`` (local training of the paper's SimpleNet: SGD momentum,
batch 64; samples/s, or speed relative to ``im2col``):

=====================================  =========  ==========  ===========  =========
case                                    ``xla``    ``im2col``  im2col_flat  patches
=====================================  =========  ==========  ===========  =========
H100, ``vmap`` over 100 clients         429,329    1,190,453               422,930
H100, BatchNorm, ``vmap``               551,076    1,054,478               403,045
H100, ResNet-18 at 1/4 width, ``vmap``   45,740       76,620
2-core AMD EPYC, one client, paired     x 0.06     x 1         x 0.88       x 0.25
2-core AMD EPYC, BatchNorm, paired      x 0.08     x 1         x 0.85       x 0.37
=====================================  =========  ==========  ===========  =========

GPU rows: ``benchmarks/results/conv_impl_gpu.jsonl`` (JAX 0.11.2; 2 local epochs of 600 samples;
the PyTorch per-client loop ran 28,196 samples/s there). CPU rows: the ``paired/...`` lines of
``benchmarks/results/conv_impl_cpu.jsonl`` (JAX 0.10.2): the implementations timed in interleaved
rounds in one process, median per-round ratio, on a machine that other processes kept busy; XLA's
own convolution (its weight gradient above all) is the slow one even without ``vmap``. So
``im2col`` is the default on CPU and on GPU. TPUs run convolutions natively on the MXU and were not
measured: ``xla`` there.

``im2col`` materialises the patches, ``kh * kw`` times the input activation: for wide models
``vmap``-ed over many clients on a GPU, bound the memory by running the clients in chunks
(``lax.map(..., batch_size=k)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["CONV_IMPLS", "Conv", "avg_pool", "conv2d", "default_conv_impl", "max_pool"]

CONV_IMPLS = ("auto", "xla", "im2col", "im2col_flat", "patches")


def default_conv_impl(backend: str | None = None) -> str:
    """The convolution implementation measured fastest on ``backend`` (default: JAX's default).

    ``"im2col"`` on CPU and GPU (see the module docstring for the numbers and
    ``benchmarks/results/conv_impl_*.jsonl`` for the runs), ``"xla"`` elsewhere (not measured).
    """
    backend = backend or jax.default_backend()
    return "im2col" if backend in ("cpu", "gpu", "cuda", "rocm") else "xla"


def _pad_amounts(padding: str | Sequence[tuple[int, int]], kh: int, kw: int):
    if isinstance(padding, str):
        padding = padding.upper()
        if padding == "VALID":
            return ((0, 0), (0, 0))
        if padding == "SAME":
            # Stride-1 SAME; for strided SAME we follow lax's convention (more padding at the end).
            return (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2))
        raise ValueError(f"padding must be 'SAME', 'VALID' or explicit pairs, got {padding!r}")
    return tuple(tuple(p) for p in padding)


def _same_pads_strided(size: int, k: int, s: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return (total // 2, total - total // 2)


def _im2col_two_stage(x: jax.Array, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int):
    """Patches ``[B, ho, wo, kh * kw * c]`` ordered ``(i, j, c)`` from ``kw + kh`` slices.

    First ``kw`` slices along W are concatenated on the channel axis (``[B, Hp, wo, kw * c]``,
    ordered ``(j, c)``), then ``kh`` slices of that along H (ordered ``(i, j, c)``). The backward
    pass is ``kw + kh`` pads and adds instead of ``kh * kw``, and each piece is ``kw`` (then ``kh``)
    times wider, which XLA:CPU moves much faster than ``kh * kw`` thin slices.
    """
    if kw == 1:
        xw = x[:, :, : sw * (wo - 1) + 1 : sw, :]
    else:
        xw = jnp.concatenate(
            [x[:, :, j : j + sw * (wo - 1) + 1 : sw, :] for j in range(kw)], axis=-1
        )
    if kh == 1:
        return xw[:, : sh * (ho - 1) + 1 : sh]
    return jnp.concatenate([xw[:, i : i + sh * (ho - 1) + 1 : sh] for i in range(kh)], axis=-1)


def _im2col_flat(x: jax.Array, kh: int, kw: int, sh: int, sw: int, ho: int, wo: int):
    """Patches ``[B, ho, wo, kh * kw * c]`` ordered ``(i, j, c)`` from ``kh * kw`` slices."""
    cols = [
        x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int] = (1, 1),
    padding: Any = "SAME",
    impl: str = "auto",
) -> jax.Array:
    """2-D convolution, NHWC input, HWIO kernel, no bias.

    Args:
      x: ``[B, H, W, C_in]``.
      kernel: ``[kh, kw, C_in, C_out]``.
      strides: ``(sh, sw)``.
      padding: ``"SAME"``, ``"VALID"`` or ``((top, bottom), (left, right))``.
      impl: one of ``CONV_IMPLS``.

    Returns:
      ``[B, H_out, W_out, C_out]``, equal (to float rounding) whichever ``impl`` computes it.
    """
    if impl == "auto":
        impl = default_conv_impl()
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}")
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    if isinstance(padding, str) and padding.upper() == "SAME":
        pads = (_same_pads_strided(x.shape[1], kh, sh), _same_pads_strided(x.shape[2], kw, sw))
    else:
        pads = _pad_amounts(padding, kh, kw)
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=strides,
            padding=pads,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    if impl == "patches":
        patches = jax.lax.conv_general_dilated_patches(
            x, (kh, kw), strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )  # [B, ho, wo, c_in * kh * kw], ordered (c, i, j)
        return patches @ kernel.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    hp, wp = x.shape[1], x.shape[2]
    ho = (hp - kh) // sh + 1
    wo = (wp - kw) // sw + 1
    build = _im2col_two_stage if impl == "im2col" else _im2col_flat
    patches = build(x, kh, kw, sh, sw, ho, wo)  # [B, ho, wo, kh * kw * c_in], ordered (i, j, c)
    return patches @ kernel.reshape(kh * kw * cin, cout)


class Conv(nn.Module):
    """Drop-in for :class:`flax.linen.Conv` (NHWC, same parameter names and layout)."""

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    impl: str = "auto"
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
        y = conv2d(x, kernel.astype(x.dtype), tuple(self.strides), self.padding, self.impl)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,)).astype(x.dtype)
        return y


def _window_first_max_vjp(window: int):
    """Non-overlapping ``window x window`` max pooling (VALID, stride = window) whose backward pass
    sends each output's gradient to the first maximum of its window in row-major order, exactly as
    :func:`flax.linen.max_pool` (``lax.reduce_window``) does, ties included. It is a single fused
    elementwise pass; the default gradient of a reshape-``max`` is not (it counts and splits ties).
    """

    @jax.custom_vjp
    def pool(x):
        b, h, w, c = x.shape
        return x.reshape(b, h // window, window, w // window, window, c).max(axis=(2, 4))

    def fwd(x):
        y = pool(x)
        return y, (x, y)

    def bwd(res, g):
        x, y = res
        b, h, w, c = x.shape
        xr = x.reshape(b, h // window, window, w // window, window, c)
        taken = None
        rows = []
        for i in range(window):
            cols = []
            for j in range(window):
                hit = xr[:, :, i, :, j, :] == y
                if taken is not None:
                    hit = hit & ~taken
                taken = hit if taken is None else taken | hit
                cols.append(jnp.where(hit, g, jnp.zeros((), g.dtype)))
            rows.append(jnp.stack(cols, axis=3))  # [b, ho, wo, window(j), c]
        dx = jnp.stack(rows, axis=2)  # [b, ho, window(i), wo, window(j), c]
        return (dx.reshape(x.shape),)

    pool.defvjp(fwd, bwd)
    return pool


_FIRST_MAX_POOLS: dict[int, Any] = {}


def max_pool(
    x: jax.Array, window: int = 2, stride: int | None = None, padding: str = "VALID"
) -> jax.Array:
    """Max pooling, NHWC; equal to :func:`flax.linen.max_pool`, gradients (and ties) included.

    Non-overlapping VALID windows (``stride == window``, the SimpleNet case) use a reshape and a
    custom backward pass (one fused elementwise op); other cases fall back to flax.
    """
    stride = window if stride is None else stride
    h, w = x.shape[1], x.shape[2]
    if stride == window and padding == "VALID":
        ho, wo = h // window, w // window
        x = x[:, : ho * window, : wo * window, :]
        if window not in _FIRST_MAX_POOLS:
            _FIRST_MAX_POOLS[window] = _window_first_max_vjp(window)
        return _FIRST_MAX_POOLS[window](x)
    return nn.max_pool(x, (window, window), (stride, stride), padding=padding)


def avg_pool(x: jax.Array, window: int = 2, stride: int | None = None) -> jax.Array:
    """Average pooling, NHWC, VALID."""
    stride = window if stride is None else stride
    b, h, w, c = x.shape
    if stride == window:
        ho, wo = h // window, w // window
        x = x[:, : ho * window, : wo * window, :]
        return x.reshape(b, ho, window, wo, window, c).mean(axis=(2, 4))
    return nn.avg_pool(x, (window, window), (stride, stride))
