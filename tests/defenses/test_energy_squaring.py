"""The LAPACK-free spectral norm (``method="squaring"``) against float64 numpy and the eigvalsh path.

Issue 16: BE relative error <= 1e-5 against float64 SVD, near-degenerate channels (equal top
singular values) included, and MARS flags the same clients as with the reference path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mars import CTX, NUM_ATTACKERS, N, federation
from test_mars import run as run_mars

from marsjax.mars import energy as energy_module
from marsjax.mars.defense import _build, mars
from marsjax.mars.energy import (
    NUM_SQUARINGS,
    backdoor_energy,
    channel_spectral_norms,
    energy_layout,
)

RTOL = 1e-5
squaring = jax.jit(lambda k: channel_spectral_norms(k, method="squaring"))
squaring_rescaled = jax.jit(lambda k: channel_spectral_norms(k, method="squaring", rescale=True))
eigvalsh = jax.jit(lambda k: channel_spectral_norms(k, method="eigvalsh"))


def svd_norms(kernel: np.ndarray) -> np.ndarray:
    """float64 ``norm(ord=2)`` of each channel's ``kh*kw x C_in`` matrix (PyTorch's, transposed)."""
    k = np.asarray(kernel, np.float64)
    kh, kw, c_in, c_out = k.shape
    return np.array([np.linalg.norm(k[..., c].reshape(kh * kw, c_in), 2) for c in range(c_out)])


def rel_err(actual, expected) -> np.ndarray:
    actual = np.asarray(actual, np.float64)
    return np.abs(actual - expected) / np.abs(expected)


def with_spectrum(rng, sigma: np.ndarray, c_in: int) -> np.ndarray:
    """A ``9 x c_in`` matrix with singular values ``sigma`` (9 of them) and random vectors."""
    u, _ = np.linalg.qr(rng.standard_normal((9, 9)))
    v, _ = np.linalg.qr(rng.standard_normal((c_in, 9)))
    return (u * sigma) @ v.T


@pytest.mark.parametrize(
    "shape",
    [(3, 3, 64, 128), (3, 3, 512, 16), (7, 7, 3, 64), (1, 1, 64, 32), (3, 3, 5, 40), (5, 5, 1, 8)],
)
def test_random_kernels_match_float64_svd(shape):
    rng = np.random.default_rng(sum(shape))
    kernel = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    want = svd_norms(kernel)
    fast = np.asarray(squaring(jnp.asarray(kernel)))
    assert fast.shape == (shape[-1],) and fast.dtype == np.float32
    assert rel_err(fast, want).max() <= RTOL
    # and within float32 rounding of the reference path
    assert rel_err(fast, np.asarray(eigvalsh(jnp.asarray(kernel)), np.float64)).max() <= 2 * RTOL


def test_near_degenerate_zero_and_extreme_channels():
    rng = np.random.default_rng(16)
    c_in = 64
    spectra = []
    base = np.sort(rng.uniform(0.1, 0.9, 9))[::-1]
    for top in (2, 3, 9):  # 2, 3 or all 9 singular values exactly equal at the top
        s = base.copy()
        s[:top] = 1.0
        spectra.append(s)
    # a tiny gap between the top two: the squarings' hardest case is a gap near 2**-NUM_SQUARINGS
    for gap in (1e-8, 1e-6, 2.0**-NUM_SQUARINGS, 1e-5, 1e-4, 1e-3, 1e-2):
        s = base.copy()
        s[0], s[1] = 1.0, np.sqrt(1.0 - gap)
        spectra.append(s)
    s = base.copy()  # eight values just below the top one
    s[0], s[1:] = 1.0, np.sqrt(1.0 - 2.0**-NUM_SQUARINGS)
    spectra.append(s)
    spectra.append(np.r_[1.0, np.zeros(8)])  # rank one
    spectra.append(np.logspace(0, -7, 9))  # seven decades
    cols = [with_spectrum(rng, s, c_in) for s in spectra]
    cols.append(1e-12 * rng.standard_normal((9, c_in)))  # tiny scale
    cols.append(1e12 * rng.standard_normal((9, c_in)))  # huge scale
    cols.append(1e-3 * with_spectrum(rng, spectra[0], c_in))  # degenerate and small
    cols.append(1e3 * with_spectrum(rng, spectra[1], c_in))  # degenerate and large
    cols.append(np.zeros((9, c_in)))
    kernel = np.stack(cols, axis=-1).reshape(3, 3, c_in, len(cols)).astype(np.float32)
    want = svd_norms(kernel)
    zero = len(cols) - 1

    fast = np.asarray(squaring(jnp.asarray(kernel)))
    assert fast[zero] == 0.0
    assert rel_err(fast[:zero], want[:zero]).max() <= RTOL
    robust = np.asarray(squaring_rescaled(jnp.asarray(kernel)))
    assert robust[zero] == 0.0
    assert rel_err(robust[:zero], want[:zero]).max() <= RTOL


def test_out_of_range_channels_are_non_finite_or_rescaled():
    rng = np.random.default_rng(3)
    k = np.empty((3, 3, 32, 3), np.float32)
    k[..., 0] = 1e30 * rng.standard_normal((3, 3, 32))  # squares overflow float32
    k[..., 1] = 1e-30 * rng.standard_normal((3, 3, 32))  # squares underflow float32
    k[..., 2] = rng.standard_normal((3, 3, 32))
    k[0, 0, 0, 2] = np.nan
    want = svd_norms(k[..., :2])
    fast = np.asarray(squaring(jnp.asarray(k)))
    assert not np.isfinite(fast[0])  # never a wrong finite value
    assert np.isnan(fast[2])
    robust = np.asarray(squaring_rescaled(jnp.asarray(k)))
    assert rel_err(robust[:2], want).max() <= RTOL


def test_client_axes_zero_and_nan_channels_leave_the_others_exact():
    """Clients in front (explicit and under ``vmap``), a zero and a NaN channel in the batch, the
    hardest gap in another client: every other channel as float64 SVD has it (the rescaling
    every ``SQUARINGS_PER_SCALE`` products is per matrix)."""
    rng = np.random.default_rng(8)
    kernels = (0.05 * rng.standard_normal((3, 3, 3, 16, 45))).astype(np.float32)  # 3 clients
    kernels[1, ..., 5] = 0.0
    kernels[1, 0, 0, 0, 9] = np.nan
    s = np.sort(rng.uniform(0.1, 0.9, 9))[::-1]
    s[0], s[1] = 1.0, np.sqrt(1.0 - 2.0**-NUM_SQUARINGS)  # the hardest gap
    kernels[2, ..., 40] = with_spectrum(rng, s, 16).reshape(3, 3, 16)
    want = np.stack([svd_norms(np.nan_to_num(k)) for k in kernels])
    got = np.asarray(jax.jit(jax.vmap(squaring))(jnp.asarray(kernels)))
    one = np.asarray(squaring(jnp.asarray(kernels[2])))
    assert np.isnan(got[1, 9]) and got[1, 5] == 0.0
    ok = np.ones(want.shape, bool)
    ok[1, [5, 9]] = False
    assert rel_err(got[ok], want[ok]).max() <= RTOL
    assert rel_err(one, want[2]).max() <= RTOL
    # explicit client axes in front of the Gram batch, without vmap
    g = np.einsum("nik,njk->nij", *(2 * [rng.standard_normal((2 * 21, 9, 16))]))
    g = g.reshape(2, 21, 9, 9).astype(np.float32)
    lam = np.asarray(energy_module._max_eig_squaring([jnp.asarray(g)], NUM_SQUARINGS)[0])
    lam_want = np.linalg.eigvalsh(g.astype(np.float64))[..., -1]
    assert lam.shape == (2, 21) and rel_err(lam, lam_want).max() <= RTOL


def test_backdoor_energy_methods_agree_with_bn_dense_and_vmap():
    rng = np.random.default_rng(4)
    v = {
        "params": {
            "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32)},
            "bn": {
                "scale": jnp.asarray(rng.standard_normal(32), jnp.float32),
                "bias": jnp.zeros(32),
            },
            "stem": {"kernel": jnp.asarray(rng.standard_normal((7, 7, 3, 8)), jnp.float32)},
            "fc": {"kernel": jnp.asarray(rng.standard_normal((32, 10)), jnp.float32)},
        },
        "batch_stats": {
            "bn": {"mean": jnp.zeros(32), "var": jnp.asarray(rng.uniform(0.1, 3, 32), jnp.float32)}
        },
    }
    layout = energy_layout(v, layers="all")
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a, 3 * a]), v)
    stacked["batch_stats"]["bn"]["var"] = jnp.abs(stacked["batch_stats"]["bn"]["var"])

    def be(method):
        f = jax.jit(jax.vmap(lambda t: backdoor_energy(t, layout=layout, method=method)))
        return [np.asarray(x, np.float64) for x in f(stacked)]

    fast, ref = be("squaring"), be("eigvalsh")
    for layer, a, b in zip(layout, fast, ref):
        assert a.shape == b.shape
        assert rel_err(a, b).max() <= 2 * RTOL, layer.path
    # the dense layer: one value, the whole matrix's spectral norm, checked against numpy too
    fc = next(i for i, lay in enumerate(layout) if lay.kind == "dense")
    want = [
        np.linalg.norm(np.asarray(stacked["params"]["fc"]["kernel"][i], np.float64), 2)
        for i in range(3)
    ]
    assert rel_err(fast[fc][:, 0], np.array(want)).max() <= RTOL
    with pytest.raises(ValueError, match="method"):
        backdoor_energy(v, layout=layout, method="svd")


@pytest.mark.parametrize("method", ["eigvalsh", "squaring"])
def test_a_client_axis_of_size_one_gives_the_same_values(method):
    # Regression: a Gram formulation (elementwise product summed over C_in in the flax layout)
    # was compiled by jaxlib 0.10.2's XLA:CPU into an XNNPACK fusion that returned wrong values
    # under vmap with one client; MARS runs with any number of clients, one included.
    rng = np.random.default_rng(9)
    kernels = jnp.asarray(rng.standard_normal((1, 3, 3, 64, 32)), jnp.float32)
    one = jax.jit(jax.vmap(lambda k: channel_spectral_norms(k, method=method)))(kernels)
    want = svd_norms(np.asarray(kernels[0]))
    assert rel_err(np.asarray(one)[0], want).max() <= RTOL


def _hostile(updates):
    p = updates["params"]
    p["conv1"]["kernel"] = p["conv1"]["kernel"].at[5, 0, 0, 0, 0].set(jnp.nan)
    updates["batch_stats"]["bn2"]["var"] = updates["batch_stats"]["bn2"]["var"].at[8].set(-jnp.inf)
    p["bn0"]["scale"] = p["bn0"]["scale"].at[10].set(3e38)  # finite, but its energy overflows
    return updates


def _huge_row(updates):
    return jax.tree.map(lambda a: a.at[6].set(1e30), updates)


# The federations and options of tests/defenses/test_mars.py that change what the energy stage
# sees: (federation kwargs, change to the updates, MARS options). The energy method changes only
# the CBE rows, so the selection-stage options (MARS*, the paper's clustering, a majority of
# attackers) are covered by the CBE agreement here and by tests/defenses/test_mars.py.
CASES = {
    "attackers": ({}, None, {}),
    "all_benign": ({"num_attackers": 0}, None, {}),
    "hostile_rows": ({}, _hostile, {}),
    "huge_row": ({}, _huge_row, {}),
    "chunked": ({"seed": 2}, None, {"chunk_size": 8}),
    "all_layers": ({}, None, {"layers": "all"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mars_flags_the_same_clients_as_the_reference_path(case):
    fed_kwargs, change, options = CASES[case]
    g, updates = federation(**fed_kwargs)
    if change is not None:
        updates = change(updates)
    ref = run_mars(updates, g, energy_method="eigvalsh", **options)
    fast = run_mars(updates, g, energy_method="squaring", **options)
    np.testing.assert_array_equal(np.asarray(fast.accepted), np.asarray(ref.accepted))
    # scores are W1 distances, differences of CBE values that agree to ~1e-6 relative: a
    # benign client's score (~1e-3 of the values) keeps ~1e-4 of relative noise
    np.testing.assert_allclose(np.asarray(fast.scores), np.asarray(ref.scores), rtol=1e-3)
    if case == "attackers":  # and both are right
        want = np.r_[np.zeros(NUM_ATTACKERS), np.ones(N - NUM_ATTACKERS)]
        np.testing.assert_array_equal(np.asarray(fast.accepted), want)


def test_energy_method_is_validated_by_the_factory_and_registry_hook():
    with pytest.raises(ValueError, match="energy_method"):
        mars(energy_method="lapack")
    with pytest.raises(ValueError, match="energy_method"):
        _build(CTX, energy_method="svd")
