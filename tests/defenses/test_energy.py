"""Backdoor energy and CBE (marsjax.defenses.energy) against an independent numpy/PyTorch reference."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax.defenses.energy import (
    backdoor_energy,
    cbe_counts,
    cbe_size,
    channel_spectral_norms,
    concentrated_backdoor_energy,
    energy_layout,
    layout_channel_counts,
    module_call_order,
)
from marsjax.models import ResNet18, SimpleNet

RTOL = 1e-5
jit_be = jax.jit(backdoor_energy, static_argnames=("layers", "layout"))


def random_like(shapes, rng: np.random.Generator, scale: float = 0.1):
    """Random float32 arrays with the shapes of ``shapes`` (no model init to compile)."""
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32), shapes
    )


# ----------------------------------------------------------------------------- numpy reference
def ref_conv_be(kernel_hwio: np.ndarray, gamma=None, var=None, eps: float = 1e-5) -> np.ndarray:
    """The official CBE() loop, re-derived in the PyTorch layout, float64 numpy SVD."""
    w = np.asarray(kernel_hwio, np.float64).transpose(3, 2, 0, 1)  # [C_out, C_in, kh, kw]
    c_out, c_in, kh, kw = w.shape
    if gamma is None:
        scale = np.ones(c_out)
    else:
        v = np.asarray(var, np.float64).copy()
        v[np.isnan(v) | (v < 0)] = 0.0
        scale = np.abs(np.asarray(gamma, np.float64) / np.sqrt(v + eps))
    out = []
    for k in range(c_out):
        m = w[k].reshape(c_in, kh * kw) * scale[k]
        out.append(np.linalg.svd(m, compute_uv=False).max())
    return np.array(out)


def conv_bn_vars(rng: np.random.Generator, kh, kw, c_in, c_out, var=None, kernel=None):
    kernel = rng.standard_normal((kh, kw, c_in, c_out)) if kernel is None else kernel
    gamma = rng.standard_normal(c_out)
    var = rng.uniform(0.1, 3.0, c_out) if var is None else var
    v = {
        "params": {
            "conv": {"kernel": jnp.asarray(kernel, jnp.float32)},
            "bn": {"scale": jnp.asarray(gamma, jnp.float32), "bias": jnp.zeros(c_out)},
        },
        "batch_stats": {"bn": {"mean": jnp.zeros(c_out), "var": jnp.asarray(var, jnp.float32)}},
    }
    return v, np.asarray(kernel, np.float32), gamma.astype(np.float32), np.asarray(var, np.float32)


def assert_rel(actual, expected, rtol=RTOL):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    err = np.abs(actual - expected) / np.maximum(np.abs(expected), 1e-300)
    assert err.max() <= rtol, f"max relative error {err.max():.3g}"


# ----------------------------------------------------------------------------- BE vs reference
@pytest.mark.parametrize(
    "kh,kw,c_in,c_out",
    [(3, 3, 64, 32), (3, 3, 5, 16), (7, 7, 3, 16), (1, 1, 32, 16), (3, 3, 1, 8), (5, 5, 20, 12)],
)
def test_be_matches_numpy_svd(kh, kw, c_in, c_out):
    rng = np.random.default_rng(kh * 100 + c_in)
    var = rng.uniform(0.1, 3.0, c_out)
    var[0], var[1], var[2] = np.nan, -0.5, 0.0  # NaN and negative running_var -> 0, as the code
    v, kernel, gamma, var32 = conv_bn_vars(rng, kh, kw, c_in, c_out, var=var)
    (be,) = jit_be(v, layout=energy_layout(v))
    assert be.shape == (c_out,) and be.dtype == jnp.float32
    assert_rel(be, ref_conv_be(kernel, gamma, var32))


def test_be_ill_conditioned_and_extreme_scales():
    rng = np.random.default_rng(1)
    c_in, c_out = 128, 8
    k = np.empty((3, 3, c_in, c_out))
    u, s = rng.standard_normal((9, 1)), rng.standard_normal((1, c_in))
    k[..., 0] = (u @ s).reshape(3, 3, c_in)  # exactly rank 1
    k[..., 1] = k[..., 0] + 1e-6 * rng.standard_normal((3, 3, c_in))  # nearly rank 1
    cols = np.logspace(-7, 0, 9).reshape(3, 3, 1)  # singular values over 7 decades
    k[..., 2] = rng.standard_normal((3, 3, c_in)) * cols
    k[..., 3] = 1e-12 * rng.standard_normal((3, 3, c_in))
    k[..., 4] = 1e12 * rng.standard_normal((3, 3, c_in))
    k[..., 5] = 0.0
    k[..., 6] = 1e-30 * rng.standard_normal((3, 3, c_in))  # squares underflow float32
    k[..., 7] = 1e30 * rng.standard_normal((3, 3, c_in))  # squares overflow float32
    kernel = jnp.asarray(k.astype(np.float32))
    want = ref_conv_be(np.asarray(kernel))
    fast = np.asarray(jax.jit(channel_spectral_norms)(kernel))
    assert fast[5] == 0.0
    assert_rel(fast[:5], want[:5])
    assert not np.isfinite(fast[7])  # beyond the fast range: NaN, never a wrong finite value
    robust = np.asarray(jax.jit(lambda x: channel_spectral_norms(x, rescale=True))(kernel))
    assert robust[5] == 0.0
    assert_rel(robust[[0, 1, 2, 3, 4, 6, 7]], want[[0, 1, 2, 3, 4, 6, 7]])


def test_be_is_vmappable_and_jittable():
    rng = np.random.default_rng(2)
    v, *_ = conv_bn_vars(rng, 3, 3, 16, 8)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a, -a]), v)
    stacked["batch_stats"]["bn"]["var"] = jnp.abs(stacked["batch_stats"]["bn"]["var"])
    layout = energy_layout(v)
    be = jax.jit(jax.vmap(lambda t: backdoor_energy(t, layout=layout)[0]))(stacked)
    for i in range(3):
        one = jax.tree.map(lambda a, i=i: a[i], stacked)  # a rebuilt (sorted) dict: pass layout
        np.testing.assert_allclose(be[i], backdoor_energy(one, layout=layout)[0], rtol=RTOL)


def test_conv_without_bn_is_unscaled_and_all_adds_dense():
    model = SimpleNet(10, (6, 12), 32, 3, "SAME", batch_norm=False)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    v = random_like(shapes, np.random.default_rng(7))
    layout = energy_layout(v)
    assert [(l.kind, l.path, l.norm) for l in layout] == [
        ("conv", ("conv1",), None),
        ("conv", ("conv2",), None),
    ]
    be = jit_be(v, layout=layout)
    for layer, values in zip(("conv1", "conv2"), be):
        assert_rel(values, ref_conv_be(np.asarray(v["params"][layer]["kernel"])))
    be_all = jit_be(v, layout=energy_layout(v, layers="all"))
    assert [b.shape for b in be_all] == [(6,), (12,), (1,), (1,)]
    for layer, values in zip(("fc1", "fc2"), be_all[2:]):
        want = np.linalg.norm(np.asarray(v["params"][layer]["kernel"], np.float64), 2)
        assert_rel(values, [want])


def test_plain_user_flax_stack_conv_bn():
    class UserNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Conv(8, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.relu(x)
            x = nn.Conv(16, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.Conv(16, (1, 1))(x)  # no BatchNorm after this one
            return nn.Dense(3)(x.mean((1, 2)))

    model = UserNet()
    x = jnp.zeros((1, 6, 6, 3))
    v = model.init(jax.random.key(0), x)  # eager init keeps definition order
    rng = np.random.default_rng(3)
    v["batch_stats"] = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32), v["batch_stats"]
    )
    v["params"]["BatchNorm_0"]["scale"] = jnp.asarray(rng.standard_normal(8), jnp.float32)
    want_layout = [
        ("conv", ("Conv_0",), ("BatchNorm_0",)),
        ("conv", ("Conv_1",), ("BatchNorm_1",)),
        ("conv", ("Conv_2",), None),
    ]
    layout = energy_layout(v)
    assert [(l.kind, l.path, l.norm) for l in layout] == want_layout
    be = jit_be(v, layout=layout)
    p, s = v["params"], v["batch_stats"]
    assert_rel(
        be[0],
        ref_conv_be(p["Conv_0"]["kernel"], p["BatchNorm_0"]["scale"], s["BatchNorm_0"]["var"]),
    )
    assert_rel(
        be[1],
        ref_conv_be(p["Conv_1"]["kernel"], p["BatchNorm_1"]["scale"], s["BatchNorm_1"]["var"]),
    )
    assert_rel(be[2], ref_conv_be(p["Conv_2"]["kernel"]))

    # A dict rebuilt by JAX has sorted keys: the module call order recovers the layout, and the
    # dict-order walk warns instead of silently pairing wrong layers.
    sorted_v = jax.tree.map(lambda a: a, v)
    order = module_call_order(model, x)
    assert [
        (l.kind, l.path, l.norm) for l in energy_layout(sorted_v, module_order=order)
    ] == want_layout
    with pytest.warns(UserWarning, match="definition order"):
        energy_layout(sorted_v)


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_resnet18_layout_and_cbe_counts(stem):
    model = ResNet18(10, stem)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    layout = energy_layout(shapes, module_order=module_call_order(model, x))
    assert len(layout) == 20
    assert all(l.kind == "conv" and l.norm is not None for l in layout)
    for l in layout:  # every conv pairs with the BatchNorm of the same role
        assert l.norm[:-1] == l.path[:-1]
        assert l.norm[-1] == l.path[-1].replace("conv", "bn")
    assert sum(l.path[-1] == "downsample_conv" for l in layout) == 3
    counts = cbe_counts(layout_channel_counts(layout))
    assert counts == (4,) * 5 + (7,) * 5 + (13,) * 5 + (26,) * 5
    assert cbe_size(layout) == 250
    assert len(energy_layout(shapes, layers="all", module_order=module_call_order(model, x))) == 21


def test_resnet18_be_cbe_end_to_end():
    model = ResNet18(10, "cifar")
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    rng = np.random.default_rng(4)
    v = random_like(jax.eval_shape(model.init, jax.random.key(0), x), rng)  # sorted dict
    v["batch_stats"] = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.2, 2.0, a.shape), jnp.float32), v["batch_stats"]
    )
    layout = energy_layout(v, module_order=module_call_order(model, x))

    @jax.jit
    def fn(t):
        be = backdoor_energy(t, layout=layout)
        return be, concentrated_backdoor_energy(be)

    be, cbe = fn(v)
    assert [b.shape[0] for b in be] == list(layout_channel_counts(layout))
    assert cbe.shape == (250,)
    for i in (0, 7, 19):  # stem, a downsample branch, the last conv
        layer = layout[i]
        kern = v["params"]
        for name in layer.path:
            kern = kern[name]
        bn_p, bn_s = v["params"], v["batch_stats"]
        for name in layer.norm:
            bn_p, bn_s = bn_p[name], bn_s[name]
        assert_rel(be[i], ref_conv_be(kern["kernel"], bn_p["scale"], bn_s["var"]))


# ----------------------------------------------------------------------------- CBE
def torch_cbe_layer(values: np.ndarray, kappa: float) -> np.ndarray:
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(values.astype(np.float32))
    thr = torch.quantile(t, 1 - kappa)
    return t[t >= thr].numpy()


def test_cbe_counts_match_torch_quantile():
    rng = np.random.default_rng(5)
    for kappa in (0.05, 0.01, 0.1, 0.2, 0.5, 1.0):
        sizes = list(range(1, 140)) + [255, 256, 257, 511, 512, 1000, 2048]
        counts = cbe_counts(sizes, kappa)
        for n, c in zip(sizes, counts):
            vals = rng.permutation(n).astype(np.float32) + rng.uniform(0, 0.5, n).astype(np.float32)
            assert len(torch_cbe_layer(vals, kappa)) == c, (n, kappa)
    assert cbe_counts([64, 128, 256, 512]) == (4, 7, 13, 26)


def test_cbe_keeps_channel_order_like_the_official_rule():
    rng = np.random.default_rng(6)
    layers = [rng.standard_normal(n).astype(np.float32) for n in (64, 128, 37, 512, 1)]
    got = np.asarray(concentrated_backdoor_energy([jnp.asarray(v) for v in layers]))
    want = np.concatenate([torch_cbe_layer(v, 0.05) for v in layers])
    np.testing.assert_array_equal(got, want)
    # jit + vmap over a batch of clients, static length
    batch = [jnp.asarray(np.stack([v, v[::-1]])) for v in layers]
    out = jax.jit(jax.vmap(lambda *b: concentrated_backdoor_energy(list(b))))(*batch)
    assert out.shape == (2, want.size)
    np.testing.assert_array_equal(out[0], want)


def test_cbe_ties_keep_lowest_channel_indices():
    # The threshold sits on a tie: torch keeps all 6 values >= thr, we keep the static count (4),
    # taking the tied channels of lowest index, in channel order.
    v = np.array([3.0, 9.0, 3.0, 3.0, 3.0, 3.0] + [0.0] * 58, np.float32)
    assert cbe_counts([64]) == (4,)
    out = concentrated_backdoor_energy([jnp.asarray(v)])
    np.testing.assert_array_equal(out, [3.0, 9.0, 3.0, 3.0])
    assert len(torch_cbe_layer(v, 0.05)) == 6


# ----------------------------------------------------------------------- LAPACK calls in order
def test_grouped_eigenvalues_match_numpy_with_a_nan_in_the_other_group():
    # Gram groups of three sizes; the later calls take a dependency on the earlier results (the
    # where between the operand and its transpose), which must not change any value, also when an
    # earlier group holds a NaN.
    from marsjax.defenses.energy import _max_eig_grouped

    rng = np.random.default_rng(11)
    mats = [
        rng.standard_normal((n, d, d + 2)).astype(np.float32) for n, d in ((300, 9), (7, 3), (5, 4))
    ]
    grams = [m @ m.transpose(0, 2, 1) for m in mats]
    grams[0][17, 2, 5] = grams[0][17, 5, 2] = np.nan
    got = jax.jit(lambda *g: _max_eig_grouped(list(g)))(*[jnp.asarray(g) for g in grams])
    for g, lam in zip(grams, got):
        want = np.linalg.eigvalsh(np.nan_to_num(g.astype(np.float64), nan=0.0))[:, -1]
        ok = ~np.isnan(g).any(axis=(1, 2))
        np.testing.assert_allclose(np.asarray(lam)[ok], want[ok], rtol=2e-5)
    assert np.isnan(np.asarray(got[0])[17])


_MARS_RESNET18_40_CLIENTS = """
import jax, jax.numpy as jnp
from marsjax.defenses import mars
from marsjax.defenses.energy import energy_layout, module_call_order
from marsjax.models import ResNet18
n = 40
x = jnp.zeros((1, 32, 32, 3))
model = ResNet18(num_classes=10)
v = model.init(jax.random.key(0), x, train=False)
lay = energy_layout(v, module_order=module_call_order(model, x, train=False))
scale = jnp.where(jnp.arange(n) < 8, 0.05, 0.01)
upd = jax.tree.map(
    lambda a: jnp.ones((n, *a.shape), a.dtype) * scale.reshape((-1,) + (1,) * a.ndim), v
)
d = mars(layout=lay)
res, _ = jax.jit(d.apply)(
    jax.random.key(0), upd, d.init(v), global_variables=v, client_weights=jnp.ones((n,))
)
print("ACCEPTED", "".join(str(int(a)) for a in res.accepted))
"""


def test_mars_resnet18_40_clients_does_not_deadlock_the_cpu_thread_pool():
    # Regression: with the 3x3 (stem) and 9x9 Gram groups' eigvalsh calls free to run at once,
    # this program hung for good on a 2-core CPU (both XLA pool threads blocked inside the LAPACK
    # kernel, waiting for their own parts). About 20 s and 5.5 GB when it works.
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _MARS_RESNET18_40_CLIENTS],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ACCEPTED " + "0" * 8 + "1" * 32 in proc.stdout
