"""Every convolution implementation is the same function as ``lax.conv_general_dilated``.

Outputs and gradients (w.r.t. the input and the kernel) are compared on random inputs over strides,
paddings, kernel sizes and channel counts, alone and under ``vmap`` over a client axis with
per-client kernels; the pools are compared with flax's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax.models.layers import CONV_IMPLS, Conv, avg_pool, conv2d, default_conv_impl, max_pool

IMPLS = [i for i in CONV_IMPLS if i != "auto"]

# (kernel, stride, padding, c_in, c_out, height, width)
CASES = [
    (5, 1, "VALID", 1, 4, 12, 12),  # SimpleNet's first layer: C_in = 1
    (5, 1, "VALID", 3, 5, 9, 10),
    (3, 1, "SAME", 4, 6, 8, 7),
    (3, 2, "SAME", 3, 4, 9, 8),
    (3, 2, ((1, 1), (1, 1)), 5, 3, 8, 8),  # ResNet's strided 3x3
    (1, 1, "VALID", 6, 4, 5, 5),
    (1, 2, "VALID", 6, 4, 7, 6),  # ResNet's downsample
    (7, 2, ((3, 3), (3, 3)), 3, 4, 16, 15),  # ImageNet stem
    (2, 2, "SAME", 2, 3, 7, 7),  # even kernel, uneven SAME padding
    (3, 1, ((0, 2), (1, 0)), 2, 3, 6, 6),  # asymmetric explicit padding
]


def _ref(x, k, stride, padding):
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _inputs(seed, batch, h, w, cin, kernel, cout):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.standard_normal((batch, h, w, cin), dtype=np.float32))
    k = jnp.asarray(r.standard_normal((kernel, kernel, cin, cout), dtype=np.float32))
    return x, k


def _value_and_vjp(fn, x, cot):
    @jax.jit
    def run(a):
        out, vjp = jax.vjp(fn, a)
        return out, vjp(cot)[0]

    return run(x)


def _close(a, b, scale=1.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * scale)


def _conv_and_vjp(fn, x, k):
    out_shape = jax.eval_shape(fn, x, k).shape
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape, dtype=np.float32))

    @jax.jit
    def run(a, b):
        out, vjp = jax.vjp(fn, a, b)
        return out, vjp(cot)

    return run(x, k)


_REFERENCE: dict = {}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[0]}s{c[1]}{c[2]}ci{c[3]}")
def test_conv_matches_lax_outputs_and_grads(impl, case):
    kernel, stride, padding, cin, cout, h, w = case
    x, k = _inputs(0, 2, h, w, cin, kernel, cout)
    key = repr(case)
    if key not in _REFERENCE:
        _REFERENCE[key] = _conv_and_vjp(lambda a, b: _ref(a, b, stride, padding), x, k)
    ref, (rgx, rgk) = _REFERENCE[key]
    out, (gx, gk) = _conv_and_vjp(lambda a, b: conv2d(a, b, (stride, stride), padding, impl), x, k)
    assert out.shape == ref.shape
    scale = float(np.sqrt(kernel * kernel * cin))
    _close(out, ref, scale)
    _close(gx, rgx, scale)
    _close(gk, rgk, scale * np.sqrt(h * w))


@pytest.mark.parametrize("impl", IMPLS)
def test_conv_under_vmap_with_per_client_kernels(impl):
    clients, kernel, cin, cout = 3, 5, 2, 4
    r = np.random.default_rng(2)
    x = jnp.asarray(r.standard_normal((clients, 2, 10, 10, cin), dtype=np.float32))
    k = jnp.asarray(r.standard_normal((clients, kernel, kernel, cin, cout), dtype=np.float32))

    def loss(fn, xs, ks):
        return jnp.sum(jnp.sin(fn(xs, ks)))

    mine = jax.vmap(lambda a, b: conv2d(a, b, (1, 1), "VALID", impl))
    ref = jax.vmap(lambda a, b: _ref(a, b, 1, "VALID"))
    _close(jax.jit(mine)(x, k), ref(x, k), 10.0)
    g = jax.jit(jax.grad(lambda a, b: loss(mine, a, b), argnums=(0, 1)))(x, k)
    rg = jax.grad(lambda a, b: loss(ref, a, b), argnums=(0, 1))(x, k)
    _close(g[0], rg[0], 10.0)
    _close(g[1], rg[1], 100.0)


def test_conv_rejects_unknown_impl():
    x, k = _inputs(0, 1, 5, 5, 1, 3, 2)
    with pytest.raises(ValueError, match="conv impl"):
        conv2d(x, k, impl="nope")


@pytest.mark.parametrize("impl", IMPLS)
def test_conv_module_matches_flax_conv(impl):
    x, _ = _inputs(3, 2, 9, 9, 3, 3, 4)
    ref = nn.Conv(4, (3, 3), (2, 2), padding="SAME")
    mine = Conv(4, (3, 3), (2, 2), padding="SAME", impl=impl)
    variables = ref.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, mine.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables
    )
    _close(mine.apply(variables, x), ref.apply(variables, x), 5.0)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_default_conv_impl_is_a_real_impl(backend):
    assert default_conv_impl(backend) in IMPLS


@pytest.mark.parametrize("window", [2, 3])
def test_max_pool_gradient_goes_to_the_first_maximum_as_flax(window):
    # Ties (ReLU zeros, small integers): flax sends the gradient to the first maximum of a window.
    r = np.random.default_rng(5)
    x = jnp.stack(
        [
            jnp.zeros((6, 6, 2)),
            jnp.asarray(r.integers(0, 3, (6, 6, 2)).astype(np.float32)),
            jnp.asarray(r.integers(0, 2, (6, 6, 2)).astype(np.float32)),
        ]
    )
    w = (window, window)

    def grads(a):
        return (
            jax.grad(lambda t: jnp.sum(max_pool(t, window) ** 2 + max_pool(t, window)))(a),
            jax.grad(lambda t: jnp.sum(nn.max_pool(t, w, w) ** 2 + nn.max_pool(t, w, w)))(a),
        )

    mine, ref = jax.jit(grads)(x)
    np.testing.assert_array_equal(np.asarray(mine), np.asarray(ref))


@pytest.mark.parametrize(
    "window,stride,shape",
    [
        (2, None, (2, 8, 8, 3)),
        (2, None, (2, 7, 9, 3)),
        (3, 2, (2, 9, 9, 2)),
        (3, None, (1, 9, 6, 2)),
    ],
)
def test_pools_match_flax(window, stride, shape):
    r = np.random.default_rng(4)
    x = jnp.asarray(r.standard_normal(shape, dtype=np.float32))
    s = window if stride is None else stride
    for mine, ref in [
        (lambda a: max_pool(a, window, stride), lambda a: nn.max_pool(a, (window,) * 2, (s, s))),
        (lambda a: avg_pool(a, window, stride), lambda a: nn.avg_pool(a, (window,) * 2, (s, s))),
    ]:
        out_shape = jax.eval_shape(ref, x).shape
        cot = jnp.asarray(r.standard_normal(out_shape, dtype=np.float32))

        (out, g), (rout, rg) = _value_and_vjp(mine, x, cot), _value_and_vjp(ref, x, cot)
        assert out.shape == rout.shape
        _close(out, rout)
        _close(g, rg)
