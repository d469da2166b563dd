"""marsjax.tree's weighted sum / mean (a checked GEMV) against numpy on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax.tree import weighted_mean, weighted_sum


def _tree(rng, n):
    return {
        "params": {
            "conv": {"kernel": rng.normal(size=(n, 3, 3, 2, 4)).astype(np.float32)},
            "dense": {"bias": rng.normal(size=(n, 5)).astype(np.float32)},
        },
        "batch_stats": {"bn": {"mean": rng.normal(size=(n, 4)).astype(np.float32)}},
    }


def _np_sum(tree, w, keep):
    """float64 reference: sum over the rows with keep, weights w."""
    return jax.tree.map(
        lambda a: np.tensordot(w[keep].astype(np.float64), a[keep].astype(np.float64), axes=1),
        tree,
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_sum_and_mean_match_numpy(seed):
    rng = np.random.default_rng(seed)
    n = 7
    tree = _tree(rng, n)
    w = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
    w[[1, 4]] = 0.0
    keep = w != 0
    got = jax.jit(weighted_sum)(tree, jnp.asarray(w))
    want = _np_sum(tree, w, keep)
    jax.tree.map(lambda g, x: np.testing.assert_allclose(g, x, rtol=1e-5, atol=1e-5), got, want)
    got_mean = jax.jit(weighted_mean)(tree, jnp.asarray(w))
    jax.tree.map(
        lambda g, x: np.testing.assert_allclose(g, x / w.sum(), rtol=1e-5, atol=1e-5),
        got_mean,
        want,
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38])
def test_rejected_rows_never_contribute_even_non_finite(bad):
    rng = np.random.default_rng(3)
    n = 6
    tree = _tree(rng, n)
    w = np.ones(n, np.float32)
    w[2] = 0.0
    for leaf in jax.tree.leaves(tree):
        leaf[2] = bad  # the rejected row is hostile
    got = jax.jit(weighted_mean)(tree, jnp.asarray(w))
    want = _np_sum(tree, w, w != 0)
    for g, x in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, x / (n - 1), rtol=1e-5, atol=1e-5)


def test_accepted_non_finite_row_propagates_and_zero_weights_give_zero():
    rng = np.random.default_rng(4)
    tree = _tree(rng, 4)
    tree["params"]["dense"]["bias"][1, 0] = np.nan
    out = weighted_sum(tree, jnp.ones(4))
    assert np.isnan(out["params"]["dense"]["bias"][0])  # an accepted NaN is not hidden
    assert np.all(np.isfinite(out["params"]["conv"]["kernel"]))
    zero = weighted_mean(_tree(rng, 4), jnp.zeros(4))
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(zero))


def test_vmapped_over_variants_matches_one_by_one():
    # a batched sweep vmaps the aggregation over variants: the cond becomes a select
    rng = np.random.default_rng(5)
    n, v = 5, 3
    trees = [_tree(rng, n) for _ in range(v)]
    trees[1]["params"]["dense"]["bias"][0] = np.inf
    ws = rng.uniform(0.5, 1.5, size=(v, n)).astype(np.float32)
    ws[1, 0] = 0.0
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *trees)
    got = jax.vmap(weighted_mean)(stacked, jnp.asarray(ws))
    for i in range(v):
        one = weighted_mean(trees[i], jnp.asarray(ws[i]))
        jax.tree.map(
            lambda g, x, i=i: np.testing.assert_allclose(g[i], x, rtol=1e-6, atol=1e-6), got, one
        )
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(one))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_row_is_finite_matches_numpy_with_hostile_entries(dtype):
    from marsjax.tree import row_is_finite

    rng = np.random.default_rng(6)
    tree = jax.tree.map(lambda a: a.astype(dtype), _tree(rng, 12))
    leaves = jax.tree.leaves(tree)
    big = np.finfo(dtype).max
    for row, value in [(1, np.nan), (4, np.inf), (6, -np.inf), (8, big), (9, -big), (10, 0.0)]:
        leaf = leaves[row % len(leaves)]
        leaf[row].flat[rng.integers(leaf[row].size)] = value
    want = np.all(np.stack([np.isfinite(a.reshape(12, -1)).all(axis=1) for a in leaves]), axis=0)
    got = np.asarray(jax.jit(row_is_finite)(tree))
    np.testing.assert_array_equal(got, want)
    assert list(np.flatnonzero(~got)) == [1, 4, 6]  # huge finite values are finite
