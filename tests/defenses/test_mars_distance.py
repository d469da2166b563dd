"""MARS's ``distance`` option (the paper's Table 7: Wasserstein, Euclidean or cosine distance
between CBE vectors): each distance against scipy on random CBE rows, the default path unchanged
bit for bit, and the decision on hand-made rows where W1 and the other two disagree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.stats

from marsjax.config import ConfigError, get_preset, override, validate
from marsjax.mars.clustering import k_wmeans
from marsjax.mars.defense import (
    DISTANCES,
    cbe_distance_matrix,
    cbe_distance_to_rows,
    mars,
    mars_select,
)
from marsjax.mars.wasserstein import wasserstein_1d, wasserstein_to_rows

KEY0 = jax.random.key(0)


def _scipy_matrix(x, y, distance):
    if distance == "wasserstein":
        return np.array([[scipy.stats.wasserstein_distance(a, b) for b in y] for a in x])
    return scipy.spatial.distance.cdist(x.astype(np.float64), y.astype(np.float64), distance)


@pytest.mark.parametrize("distance", DISTANCES)
def test_distance_matrices_match_scipy_on_random_cbe_rows(distance):
    rng = np.random.default_rng(3)
    x = rng.gamma(2.0, 0.5, size=(9, 13)).astype(np.float32)  # CBE values are >= 0
    rows = rng.gamma(2.0, 0.5, size=(3, 13)).astype(np.float32)
    d = np.asarray(cbe_distance_matrix(jnp.asarray(x), distance))
    np.testing.assert_allclose(d, _scipy_matrix(x, x, distance), rtol=2e-5, atol=2e-6)
    assert np.array_equal(d, d.T) and np.all(np.diag(d) == 0)
    to = np.asarray(cbe_distance_to_rows(jnp.asarray(x), jnp.asarray(rows), distance))
    np.testing.assert_allclose(to, _scipy_matrix(x, rows, distance), rtol=2e-5, atol=2e-6)


def test_cosine_of_a_zero_row_is_one_not_nan():
    x = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0]])
    d = np.asarray(cbe_distance_matrix(x, "cosine"))
    assert np.all(np.isfinite(d)) and d[0, 1] == pytest.approx(1.0)


def test_default_distance_is_the_wasserstein_path_bit_for_bit():
    rng = np.random.default_rng(5)
    cbe = jnp.asarray(rng.gamma(2.0, 0.5, size=(12, 10)).astype(np.float32))
    valid = jnp.asarray(np.r_[np.ones(11, bool), [False]])
    got = jax.jit(lambda c, v: mars_select(KEY0, c, v, 0.01))(cbe, valid)

    # The decision step as it read before the option existed.
    def before(c, v):
        c = jnp.where(v[:, None], c, 0.0)
        res = k_wmeans(KEY0, c, v.astype(jnp.float32), rule="code", num_clusters=2)
        member = (res.labels[:, None] == jnp.arange(2)[None, :]) & v[:, None]
        size = jnp.sum(member, axis=0)
        centers = jnp.einsum(
            "nk,nm->km", member.astype(jnp.float32), c, precision=jax.lax.Precision.HIGHEST
        ) / jnp.maximum(size, 1)[:, None].astype(jnp.float32)
        gap = wasserstein_1d(centers[0], centers[1])
        kept = jnp.argmin(jnp.sum(jnp.abs(centers), axis=1))
        scores = wasserstein_to_rows(c, centers[kept][None, :])[:, 0]
        return res.labels, centers, gap, scores

    labels, centers, gap, scores = jax.jit(before)(cbe, valid)
    assert np.array_equal(np.asarray(got.labels), np.asarray(labels))
    assert np.array_equal(np.asarray(got.centers), np.asarray(centers))
    assert np.asarray(got.gap) == np.asarray(gap)
    v = np.asarray(valid)
    assert np.array_equal(np.asarray(got.scores)[v], np.asarray(scores)[v])


# Three rows (4, 0, 0, 0) and two (0, 3, 0, 0): W1 sees nearly the same distribution (gap 1/4),
# Euclidean and cosine see orthogonal vectors (gap 5 and 1). The smaller-L1 centre is Q.
HAND = np.array([[4, 0, 0, 0]] * 3 + [[0, 3, 0, 0]] * 2, np.float32)
IS_Q = np.r_[np.zeros(3, bool), np.ones(2, bool)]


@pytest.mark.parametrize(
    ("distance", "gap"), [("wasserstein", 0.25), ("euclidean", 5.0), ("cosine", 1.0)]
)
def test_decision_uses_the_chosen_distance(distance, gap):
    fn = jax.jit(lambda c, v, e: mars_select(KEY0, c, v, e, distance=distance))

    def decide(eps):
        return jax.tree.map(np.asarray, fn(jnp.asarray(HAND), jnp.ones(5, bool), jnp.float32(eps)))

    d = decide(0.9 * gap)
    assert float(d.gap) == pytest.approx(gap, rel=1e-6)
    assert bool(d.attack) and np.array_equal(d.accepted, IS_Q)
    # scores: the chosen distance from each row to the kept (Q) centre
    ref = _scipy_matrix(HAND, HAND[IS_Q][:1], distance)[:, 0]
    np.testing.assert_allclose(d.scores, ref, rtol=1e-6, atol=1e-6)
    d = decide(1.1 * gap)
    assert not bool(d.attack) and d.accepted.all()


def test_distance_option_is_validated():
    with pytest.raises(ValueError, match="distance"):
        mars(distance="manhattan")
    with pytest.raises(ValueError, match="clustering='code'"):
        mars(distance="cosine", clustering="paper")
    cfg = override(get_preset("quickstart"), {"defense.options.distance": "cosine"})
    validate(cfg)
    with pytest.raises(ConfigError, match="distance"):
        validate(override(cfg, {"defense.options.distance": "l1"}))
