"""Backdoor energy and CBE (marsjax.defenses.energy) against an independent numpy/PyTorch reference."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax.defenses.energy import (
    AmbiguousLayoutError,
    backdoor_energy,
    cbe_counts,
    cbe_size,
    channel_spectral_norms,
    concentrated_backdoor_energy,
    energy_layout,
    layout_channel_counts,
    module_call_order,
)
from marsjax.models import ResNet18, SimpleNet, build_model

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


@pytest.mark.parametrize("gram_form", ["reduce", "pairs", "channel_major"])
def test_be_ill_conditioned_and_extreme_scales(gram_form):
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
    fast = np.asarray(jax.jit(partial(channel_spectral_norms, gram_form=gram_form))(kernel))
    assert fast[5] == 0.0
    assert_rel(fast[:5], want[:5])
    assert not np.isfinite(fast[7])  # beyond the fast range: NaN, never a wrong finite value
    robust = np.asarray(
        jax.jit(lambda x: channel_spectral_norms(x, rescale=True, gram_form=gram_form))(kernel)
    )
    assert robust[5] == 0.0
    assert_rel(robust[[0, 1, 2, 3, 4, 6, 7]], want[[0, 1, 2, 3, 4, 6, 7]])


@pytest.mark.parametrize("clients", [1, 3])
@pytest.mark.parametrize("gram_form", ["reduce", "pairs", "channel_major"])
def test_gram_forms_match_numpy_under_vmap(gram_form, clients):
    # A client axis of 1 is where jaxlib 0.10.2 miscompiled the broadcast form of the flax-layout
    # Gram (errors of 100 % and more on these shapes); the pairs and reduce forms must be exact
    # there too.
    # [5, 5, 20, 50] has a 20 x 20 Gram: "pairs" and "reduce" fall back to the channel-major form.
    rng = np.random.default_rng(clients)
    shapes = [(3, 3, 64, 32), (7, 7, 3, 64), (5, 5, 20, 50), (1, 1, 16, 8), (3, 3, 256, 64)]
    kernels = [rng.standard_normal((clients, *s)).astype(np.float32) for s in shapes]
    for method in ("eigvalsh", "squaring"):
        got = jax.jit(
            jax.vmap(
                lambda *ks, m=method: [
                    channel_spectral_norms(k, method=m, gram_form=gram_form) for k in ks
                ]
            )
        )(*[jnp.asarray(k) for k in kernels])
        for k, g in zip(kernels, got):
            want = np.stack([ref_conv_be(k[i]) for i in range(clients)])
            assert_rel(g, want, 2e-6 if method == "squaring" else RTOL)


def test_gram_form_is_checked():
    with pytest.raises(ValueError, match="gram_form"):
        channel_spectral_norms(jnp.ones((3, 3, 2, 2)), gram_form="bcast")


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

    # A dict rebuilt by JAX has sorted keys: the module call order recovers the layout. Without
    # it, BatchNorm_1 (16 channels) may follow Conv_1 or Conv_2 (both 16): an error, not a guess.
    sorted_v = jax.tree.map(lambda a: a, v)
    order = module_call_order(model, x)
    assert [
        (l.kind, l.path, l.norm) for l in energy_layout(sorted_v, module_order=order)
    ] == want_layout
    with pytest.raises(
        AmbiguousLayoutError, match="BatchNorm_1 .* follow params/Conv_1 or params/Conv_2"
    ):
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


# ------------------------------------------------------------ sorted dicts (lost definition order)
HOW_TO = (
    "layout = energy_layout(variables, module_order=module_call_order(model, x))",
    "backdoor_energy(variables, layout=layout)",
)


def randomized(tree, rng: np.random.Generator):
    """Same dict order, new values: kernels N(0, 0.1), BN scale N(0, 1), running var U(0.05, 4)."""

    def fill(node: Mapping) -> dict:
        out = {}
        for name, leaf in node.items():
            if isinstance(leaf, Mapping):
                out[name] = fill(leaf)
            elif name == "var":
                out[name] = jnp.asarray(rng.uniform(0.05, 4.0, leaf.shape), jnp.float32)
            elif name == "scale":
                out[name] = jnp.asarray(rng.standard_normal(leaf.shape), jnp.float32)
            else:
                out[name] = jnp.asarray(0.1 * rng.standard_normal(leaf.shape), jnp.float32)
        return out

    return fill(tree)


def in_call_order(tree: Mapping, order, prefix=()) -> dict:
    """``tree`` with every dict's keys in the modules' call order (the order of an eager init)."""
    rank = {path: i for i, path in enumerate(order)}
    names = sorted(tree, key=lambda n: rank.get(prefix + (n,), len(rank)))
    return {
        n: in_call_order(tree[n], order, prefix + (n,)) if isinstance(tree[n], Mapping) else tree[n]
        for n in names
    }


def numpy_be(v, pairs):
    """Independent reference: one float64 numpy SVD per channel of each (conv, BN or None)."""
    out = []
    for conv, bn in pairs:
        kernel = v["params"]
        for name in conv:
            kernel = kernel[name]
        if bn is None:
            out.append(ref_conv_be(np.asarray(kernel["kernel"])))
            continue
        scale, stats = v["params"], v["batch_stats"]
        for name in bn:
            scale, stats = scale[name], stats[name]
        out.append(ref_conv_be(np.asarray(kernel["kernel"]), scale["scale"], stats["var"]))
    return out


def assert_same_be(got, want_arrays, reference):
    assert len(got) == len(want_arrays) == len(reference)
    for g, w, r in zip(got, want_arrays, reference):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        assert_rel(g, r)


def test_sorted_simplenet_bn_gives_the_definition_order_values():
    model = build_model("simplenet", 10, batch_norm=True)
    x = jnp.zeros((1, 28, 28, 1))
    v = randomized(model.init(jax.random.key(0), x), np.random.default_rng(21))  # eager: def. order
    sorted_v = jax.tree.map(lambda a: a, v)
    assert list(sorted_v["params"]) == ["bn1", "bn2", "conv1", "conv2", "fc1", "fc2"]
    order = module_call_order(model, x)
    assert list(in_call_order(sorted_v["params"], order)) == list(v["params"])  # helper check

    by_order = energy_layout(sorted_v, module_order=order)
    pairs = [(("conv1",), ("bn1",)), (("conv2",), ("bn2",))]
    assert [(l.path, l.norm) for l in by_order] == pairs
    assert energy_layout(sorted_v) == by_order == energy_layout(v)

    reference = numpy_be(v, pairs)
    unscaled = numpy_be(v, [(c, None) for c, _ in pairs])
    for r, u in zip(reference, unscaled):  # the BatchNorm gains matter: pairing is tested
        assert np.max(np.abs(r / u - 1)) > 0.5
    want = jit_be(sorted_v, layout=by_order)
    assert_same_be(jit_be(sorted_v), want, reference)
    assert_same_be(jit_be(v), want, reference)


def resnet18_pairs(widths):
    pairs = [(("conv1",), ("bn1",))]
    for i in range(len(widths)):
        for j in range(2):
            block = f"layer{i + 1}_{j}"
            pairs += [((block, "conv1"), (block, "bn1")), ((block, "conv2"), (block, "bn2"))]
            if i > 0 and j == 0:  # stride 2: downsample branch
                pairs.append(((block, "downsample_conv"), (block, "downsample_bn")))
    return pairs


def test_sorted_resnet18_gives_the_call_order_values():
    widths = (8, 16, 16, 32)  # narrow, and two stages of 16 channels: counts cannot decide
    model = ResNet18(10, "cifar", widths=widths)
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    sorted_v = randomized(shapes, np.random.default_rng(22))
    assert list(sorted_v["params"])[:3] == ["bn1", "conv1", "fc"]
    assert list(sorted_v["params"]["layer2_0"]) == [
        "bn1", "bn2", "conv1", "conv2", "downsample_bn", "downsample_conv"
    ]  # fmt: skip
    order = module_call_order(model, x)
    definition_v = {k: in_call_order(t, order) for k, t in sorted_v.items()}

    by_order = energy_layout(sorted_v, module_order=order)
    pairs = resnet18_pairs(widths)
    assert len(pairs) == 20
    assert [(l.path, l.norm) for l in by_order] == pairs
    assert energy_layout(sorted_v) == by_order == energy_layout(definition_v)

    reference = numpy_be(sorted_v, pairs)
    want = jit_be(sorted_v, layout=by_order)
    assert_same_be(jit_be(sorted_v), want, reference)
    assert_same_be(jit_be(definition_v), want, reference)
    all_layers = energy_layout(sorted_v, layers="all")
    assert [l.path for l in all_layers if l.kind == "dense"] == [("fc",)]
    assert [l for l in all_layers if l.kind == "conv"] == list(by_order)


class AutoNamedNet(nn.Module):
    """flax automatic names only: 11 conv+BN pairs of 4 channels, a 6-channel conv without BN."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for _ in range(11):  # Conv_10 sorts before Conv_2
            x = nn.Conv(4, (3, 3))(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Conv(6, (1, 1))(x)
        return nn.Dense(3)(x.mean((1, 2)))


def test_sorted_flax_automatic_names_pair_by_index():
    model = AutoNamedNet()
    x = jax.ShapeDtypeStruct((1, 5, 5, 2), jnp.float32)
    sorted_v = randomized(
        jax.eval_shape(model.init, jax.random.key(0), x), np.random.default_rng(23)
    )
    by_order = energy_layout(sorted_v, module_order=module_call_order(model, x))
    pairs = [((f"Conv_{i}",), (f"BatchNorm_{i}",)) for i in range(11)] + [(("Conv_11",), None)]
    assert [(l.path, l.norm) for l in by_order] == pairs
    assert energy_layout(sorted_v) == by_order  # same pairs, same (natural) layer order
    assert_same_be(jit_be(sorted_v), jit_be(sorted_v, layout=by_order), numpy_be(sorted_v, pairs))


def hand_dict(layers, order=None):
    """A hand-made variables dict: ``layers`` maps a path to ("conv"|"dense"|"bn", channels)."""
    rng = np.random.default_rng(24)
    params, stats = {}, {}
    for path in order or sorted(layers):
        kind, c = layers[path]
        p, s = params, stats
        for name in path[:-1]:
            p, s = p.setdefault(name, {}), s.setdefault(name, {})
        if kind == "conv":
            p[path[-1]] = {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, c)), jnp.float32)}
        elif kind == "dense":
            p[path[-1]] = {"kernel": jnp.asarray(rng.standard_normal((5, c)), jnp.float32)}
        else:
            p[path[-1]] = {"bias": jnp.zeros(c), "scale": jnp.asarray(rng.standard_normal(c))}
            s[path[-1]] = {"mean": jnp.zeros(c), "var": jnp.asarray(rng.uniform(0.1, 3.0, c))}
    return {"params": params, "batch_stats": stats}


@pytest.mark.parametrize(
    "layers,pairs",
    [
        (  # names: conv token <-> BatchNorm token, or the layer's name + a BatchNorm token
            {("a", "conv1"): ("conv", 4), ("a", "norm1"): ("bn", 4), ("stem",): ("conv", 4),
             ("stem_bn",): ("bn", 4), ("b_conv",): ("conv", 4), ("b_bn",): ("bn", 4)},
            [(("a", "conv1"), ("a", "norm1")), (("b_conv",), ("b_bn",)), (("stem",), ("stem_bn",))],
        ),
        (  # unique channel counts
            {("conv_a",): ("conv", 4), ("conv_b",): ("conv", 6), ("norm_x",): ("bn", 6),
             ("norm_y",): ("bn", 4)},
            [(("conv_a",), ("norm_y",)), (("conv_b",), ("norm_x",))],
        ),
    ],
)  # fmt: skip
def test_sorted_hand_made_dicts_that_names_or_counts_decide(layers, pairs):
    v = hand_dict(layers)
    assert [(l.path, l.norm) for l in energy_layout(v)] == pairs
    assert_same_be(jit_be(v), jit_be(v, layout=energy_layout(v)), numpy_be(v, pairs))


@pytest.mark.parametrize(
    "layers,order,culprit",
    [
        (  # two 16-channel convs, BatchNorm names that match neither
            {("conv_a",): ("conv", 16), ("conv_b",): ("conv", 16), ("norm_x",): ("bn", 16),
             ("norm_y",): ("bn", 16)},
            None,
            "norm_x",
        ),
        (  # the same, unsorted but not in a plausible order: the dict walk leaves norm_y alone
            {("conv_a",): ("conv", 16), ("conv_b",): ("conv", 16), ("norm_x",): ("bn", 16),
             ("norm_y",): ("bn", 16)},
            [("conv_b",), ("conv_a",), ("norm_x",), ("norm_y",)],
            "norm_y",
        ),
        (  # automatic names: BatchNorm_0 may follow Conv_0 or Conv_1
            {("Conv_0",): ("conv", 16), ("Conv_1",): ("conv", 16), ("BatchNorm_0",): ("bn", 16)},
            None,
            "BatchNorm_0",
        ),
        (  # BatchNorm_0 by index follows Conv_0, but may follow the conv of the child block
            {("Conv_0",): ("conv", 16), ("BatchNorm_0",): ("bn", 16),
             ("Block_0", "Conv_0"): ("conv", 16)},
            None,
            "Block_0/Conv_0",
        ),
    ],
)  # fmt: skip
def test_ambiguous_pairing_raises_with_the_how_to(layers, order, culprit):
    v = hand_dict(layers, order)
    for call in (lambda: energy_layout(v), lambda: backdoor_energy(v), lambda: jit_be(v)):
        with pytest.raises(AmbiguousLayoutError) as err:
            call()
        assert isinstance(err.value, ValueError)
        message = str(err.value)
        assert culprit in message
        for text in HOW_TO:
            assert text in message, message
    # an explicit layout is always taken as given
    layout = energy_layout(v, module_order=list(layers))
    assert len(jit_be(v, layout=layout)) == len(layout) > 0


def test_a_batchnorm_only_dense_layers_could_take_blocks_only_all_layers():
    # BatchNorm_0 (4) follows Dense_0 or Dense_1: no conv value depends on it, "all" ones do.
    v = hand_dict(
        {("conv1",): ("conv", 8), ("bn1",): ("bn", 8), ("Dense_0",): ("dense", 4),
         ("Dense_1",): ("dense", 4), ("BatchNorm_0",): ("bn", 4)}
    )  # fmt: skip
    assert [(l.path, l.norm) for l in energy_layout(v)] == [(("conv1",), ("bn1",))]
    assert_rel(jit_be(v)[0], numpy_be(v, [(("conv1",), ("bn1",))])[0])
    with pytest.raises(AmbiguousLayoutError, match="Dense_0 or params/Dense_1"):
        energy_layout(v, layers="all")


# ----------------------------------------------------------------------------- CBE
def official_cbe_layer(values: np.ndarray, kappa: float) -> np.ndarray:
    """The official rule for one layer: keep the values ``>= torch.quantile(BE, 1 - kappa)``, in
    channel order. ``torch.quantile``'s default interpolation is numpy's ``"linear"`` method, so
    ``np.quantile(method="linear")`` is the reference (torch is not a dependency)."""
    v = values.astype(np.float32)
    thr = np.quantile(v, 1 - kappa, method="linear")
    return v[v >= thr]


def test_official_quantile_rule_by_hand():
    # 10 values 0..9: the 0.95 quantile interpolates between the sorted 9th and 10th values,
    # 8 + 0.55 * (9 - 8) = 8.55 (position 0.95 * (10 - 1) = 8.55): only 9 is kept; at kappa 0.5
    # the quantile is 4.5 and 5..9 are kept, in channel order.
    v = np.array([9, 0, 8, 1, 7, 2, 6, 3, 5, 4], np.float32)
    np.testing.assert_array_equal(official_cbe_layer(v, 0.05), [9])
    np.testing.assert_array_equal(official_cbe_layer(v, 0.5), [9, 8, 7, 6, 5])
    assert cbe_counts([10], 0.05) == (1,) and cbe_counts([10], 0.5) == (5,)


def test_cbe_counts_match_the_official_quantile_rule():
    rng = np.random.default_rng(5)
    for kappa in (0.05, 0.01, 0.1, 0.2, 0.5, 1.0):
        sizes = list(range(1, 140)) + [255, 256, 257, 511, 512, 1000, 2048]
        counts = cbe_counts(sizes, kappa)
        for n, c in zip(sizes, counts):
            vals = rng.permutation(n).astype(np.float32) + rng.uniform(0, 0.5, n).astype(np.float32)
            assert len(official_cbe_layer(vals, kappa)) == c, (n, kappa)
    assert cbe_counts([64, 128, 256, 512]) == (4, 7, 13, 26)


def test_cbe_keeps_channel_order_like_the_official_rule():
    rng = np.random.default_rng(6)
    layers = [rng.standard_normal(n).astype(np.float32) for n in (64, 128, 37, 512, 1)]
    got = np.asarray(concentrated_backdoor_energy([jnp.asarray(v) for v in layers]))
    want = np.concatenate([official_cbe_layer(v, 0.05) for v in layers])
    np.testing.assert_array_equal(got, want)
    # jit + vmap over a batch of clients, static length
    batch = [jnp.asarray(np.stack([v, v[::-1]])) for v in layers]
    out = jax.jit(jax.vmap(lambda *b: concentrated_backdoor_energy(list(b))))(*batch)
    assert out.shape == (2, want.size)
    np.testing.assert_array_equal(out[0], want)


def test_cbe_ties_keep_lowest_channel_indices():
    # The threshold sits on a tie: the official rule keeps all 6 values >= thr, we keep the static
    # count (4), taking the tied channels of lowest index, in channel order.
    v = np.array([3.0, 9.0, 3.0, 3.0, 3.0, 3.0] + [0.0] * 58, np.float32)
    assert cbe_counts([64]) == (4,)
    out = concentrated_backdoor_energy([jnp.asarray(v)])
    np.testing.assert_array_equal(out, [3.0, 9.0, 3.0, 3.0])
    assert len(official_cbe_layer(v, 0.05)) == 6


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
