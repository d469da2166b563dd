"""1-D W1 distances (marsjax.defenses.wasserstein) against the paper, scipy and ott-jax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import wasserstein_distance

from marsjax.defenses.wasserstein import wasserstein_1d, wasserstein_matrix, wasserstein_to_rows

jit_matrix = jax.jit(wasserstein_matrix, static_argnames=("method", "block_elements"))


def test_paper_toy_example():
    # Table 1 of the paper: W(L1,L2)=0.40, W(L1,L3)=2.00, W(L2,L3)=2.40.
    l1, l2, l3 = [1.0, 2, 3, 4, 5], [5.0, 5, 3, 2, 2], [1.0, 1, 1, 1, 1]
    np.testing.assert_allclose(wasserstein_1d(jnp.array(l1), jnp.array(l2)), 0.40, rtol=1e-6)
    np.testing.assert_allclose(wasserstein_1d(jnp.array(l1), jnp.array(l3)), 2.00, rtol=1e-6)
    np.testing.assert_allclose(wasserstein_1d(jnp.array(l2), jnp.array(l3)), 2.40, rtol=1e-6)
    d = jit_matrix(jnp.array([l1, l2, l3]))
    np.testing.assert_allclose(d, [[0, 0.4, 2.0], [0.4, 0, 2.4], [2.0, 2.4, 0]], rtol=1e-6)


def test_matrix_matches_scipy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((24, 50)) * rng.uniform(0.1, 5, (24, 1))).astype(np.float32)
    x[3] = np.abs(x[3]) * 10  # one far-away row
    d = np.asarray(jit_matrix(jnp.asarray(x)))
    want = np.array([[wasserstein_distance(a, b) for b in x] for a in x])
    np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(d, d.T)  # exactly symmetric
    np.testing.assert_array_equal(np.diag(d), 0.0)
    # The blocked path (lax.map over row blocks) gives the same matrix.
    np.testing.assert_allclose(jit_matrix(jnp.asarray(x), block_elements=3 * 24 * 50), d, rtol=1e-6)
    np.testing.assert_allclose(
        wasserstein_to_rows(jnp.asarray(x), jnp.asarray(x[:5])), d[:, :5], rtol=1e-6
    )


def test_unequal_sizes_match_scipy():
    rng = np.random.default_rng(1)
    for n, m in [(5, 7), (250, 13), (1, 9)]:
        a = rng.standard_normal(n).astype(np.float32)
        b = (2 + rng.standard_normal(m)).astype(np.float32)
        np.testing.assert_allclose(
            jax.jit(wasserstein_1d)(a, b), wasserstein_distance(a, b), rtol=1e-5
        )


def test_sorted_closed_form_equals_ott_uniform_solver():
    pytest.importorskip("ott")
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((10, 40)).astype(np.float32))
    d_sorted = jit_matrix(x)
    d_ott = jit_matrix(x, method="ott")
    np.testing.assert_allclose(d_sorted, d_ott, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        wasserstein_1d(x[0], x[1], method="ott"), wasserstein_1d(x[0], x[1]), rtol=1e-6
    )


def test_infinite_inputs_give_no_nan():
    inf = jnp.inf
    x = jnp.array(
        [
            [1.0, 2.0, inf, 4.0],
            [1.0, 2.0, inf, 5.0],
            [1.0, 2.0, 3.0, 4.0],
            [-inf, 2.0, inf, 4.0],
        ]
    )
    d = np.asarray(jit_matrix(x))
    assert not np.isnan(d).any()
    assert d[0, 1] == pytest.approx(0.25)  # the infinities match each other
    assert np.isinf(d[0, 2]) and np.isinf(d[0, 3])
    np.testing.assert_array_equal(np.diag(d), 0.0)
    assert not np.isnan(np.asarray(wasserstein_1d(x[0], x[3, :3]))).any()
