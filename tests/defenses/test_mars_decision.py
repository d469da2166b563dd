"""MARS's decision step (``mars_select``: the W1 gap between the two cluster centres, the
comparison with epsilon, which cluster is kept) on hand-made CBE rows worked by hand, and against
a numpy/scipy reference on random rows."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from marsjax.mars.defense import mars_select

KEY0 = jax.random.key(0)

# Rows 0-3 (cluster P) are (4, 0, 0, 0) and (0, 4, 0, 0), twice each; rows 4-5 (cluster Q) are
# (0, 0, 0, 3). W1 is 0 inside each cluster and 1/4 between them, so the clustering (the official
# rule: 2-means on the rows of the W1 matrix) finds P and Q. Worked by hand:
#   centres (elementwise means)  A_P = (2, 2, 0, 0),  A_Q = (0, 0, 0, 3);
#   gap = W1(A_P, A_Q) = mean |sort(A_P) - sort(A_Q)| = (0 + 0 + 2 + 1) / 4 = 0.75,
# where other gap measures differ: unsorted mean |A_P - A_Q| = 1.75, |mean A_P - mean A_Q| = 0.25,
# ||A_P - A_Q||_2 = sqrt(17), and W1 between the barycentres (means of the SORTED rows,
# (0, 0, 0, 4) and (0, 0, 0, 3)) = 0.25. All values are exact in float32.
# Kept cluster: L1 norms |A_P| = 4 > |A_Q| = 3, so MARS keeps Q; the L2 norms (sqrt(8) < 3) or
# the max norms (2 < 3) would keep P; MARS* keeps the majority, P (4 rows of 6).

P_ROWS = [[4, 0, 0, 0], [0, 4, 0, 0], [4, 0, 0, 0], [0, 4, 0, 0]]
Q_ROWS = [[0, 0, 0, 3], [0, 0, 0, 3]]
HAND_CBE = np.array(P_ROWS + Q_ROWS, np.float32)
IS_P = np.r_[np.ones(4, bool), np.zeros(2, bool)]
HAND_GAP = 0.75


@functools.cache
def _select_fn(select: str):
    return jax.jit(
        lambda cbe, valid, eps: mars_select(KEY0, cbe, valid, eps, clustering="code", select=select)
    )


def decide(cbe, epsilon, select="min_l1", valid=None):
    valid = np.ones(len(cbe), bool) if valid is None else valid
    d = _select_fn(select)(jnp.asarray(cbe), jnp.asarray(valid), jnp.float32(epsilon))
    return jax.tree.map(np.asarray, d)


def below(x: float) -> np.float32:
    """The largest float32 below ``x``."""
    return np.nextafter(np.float32(x), np.float32(-np.inf))


def test_gap_is_the_w1_distance_of_the_elementwise_mean_centres():
    d = decide(HAND_CBE, 10.0)
    labels = d.labels
    assert len(set(labels[IS_P])) == 1 and len(set(labels[~IS_P])) == 1
    lp, lq = labels[0], labels[4]
    assert lp != lq
    np.testing.assert_array_equal(d.centers[lp], [2, 2, 0, 0])
    np.testing.assert_array_equal(d.centers[lq], [0, 0, 0, 3])
    assert scipy.stats.wasserstein_distance([2, 2, 0, 0], [0, 0, 0, 3]) == HAND_GAP
    assert d.gap == np.float32(HAND_GAP)
    assert not d.attack  # epsilon 10 > gap


def test_no_attack_at_epsilon_equal_to_the_gap_attack_just_below():
    at = decide(HAND_CBE, HAND_GAP)
    assert not at.attack  # the official rule: no attack when gap <= epsilon
    np.testing.assert_array_equal(at.accepted, np.ones(6, bool))
    just_below = decide(HAND_CBE, below(HAND_GAP))
    assert just_below.attack
    # MARS keeps the cluster whose centre has the smaller L1 norm: Q (L1 3 against 4)
    np.testing.assert_array_equal(just_below.accepted, ~IS_P)
    assert just_below.kept == just_below.labels[4]
    # MARS* keeps the majority: P
    star = decide(HAND_CBE, below(HAND_GAP), select="majority")
    assert star.attack
    np.testing.assert_array_equal(star.accepted, IS_P)
    assert not decide(HAND_CBE, HAND_GAP, select="majority").attack


def test_centres_that_are_permutations_of_each_other_have_gap_zero():
    # P as above (centre (2, 2, 0, 0)); Q rows (0, 0, 2, 2): W1 between the clusters' rows is
    # (2 + 2) / 4 = 1, but the centres hold the same values, so W1(A_P, A_Q) = 0 (the unsorted
    # mean |A_P - A_Q| would be 2): no attack even at epsilon = 0 (0 > 0 is false).
    cbe = np.array(P_ROWS + [[0, 0, 2, 2], [0, 0, 2, 2]], np.float32)
    d = decide(cbe, 0.0)
    assert d.labels[0] != d.labels[4]
    assert d.gap == 0.0 == scipy.stats.wasserstein_distance([2, 2, 0, 0], [0, 0, 2, 2])
    assert not d.attack
    np.testing.assert_array_equal(d.accepted, np.ones(6, bool))


def test_majority_tie_goes_to_the_smaller_l1_norm_and_invalid_rows_take_no_part():
    # Rows 2 and 3 invalid: P keeps rows 0-1 (centre still (2, 2, 0, 0)), Q rows 4-5: 2 against 2
    # (a tie going to the larger L1 norm would make MARS* keep P).
    valid = np.array([1, 1, 0, 0, 1, 1], bool)
    for select in ("min_l1", "majority"):
        d = decide(HAND_CBE, below(HAND_GAP), select=select, valid=valid)
        assert d.attack and d.gap == np.float32(HAND_GAP)
        np.testing.assert_array_equal(d.accepted, valid & ~IS_P)


@pytest.mark.parametrize("seed", range(3))
def test_decision_matches_a_numpy_scipy_reference_on_random_rows(seed):
    # Two groups of random CBE rows (different scales); whatever the clustering returns, the
    # centres, the gap, the attack decision and the kept cluster follow from its labels.
    rng = np.random.default_rng(seed)
    n, m = 12, 7
    cbe = rng.gamma(2.0, 1.0, (n, m)).astype(np.float32)
    cbe[: 3 + seed] *= rng.uniform(2.0, 4.0, (3 + seed, 1)).astype(np.float32)
    valid = np.ones(n, bool)
    valid[rng.integers(n)] = False
    for select in ("min_l1", "majority"):
        for eps in (0.0, 0.5, 1e3):
            d = decide(cbe, eps, select=select, valid=valid)
            member = [(d.labels == c) & valid for c in (0, 1)]
            assert member[0].any() and member[1].any()
            centres = np.array([cbe[mk].astype(np.float64).mean(0) for mk in member])
            np.testing.assert_allclose(d.centers, centres, rtol=1e-5)
            gap = scipy.stats.wasserstein_distance(centres[0], centres[1])
            np.testing.assert_allclose(d.gap, gap, rtol=1e-5)
            attack = gap > eps
            assert bool(d.attack) == attack
            l1 = np.abs(centres).sum(1)
            sizes = [mk.sum() for mk in member]
            if select == "min_l1" or sizes[0] == sizes[1]:
                kept = int(np.argmin(l1))
            else:
                kept = int(np.argmax(sizes))
            want = valid & (~attack | (d.labels == kept))
            np.testing.assert_array_equal(d.accepted, want)
