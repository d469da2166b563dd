"""Krum / Multi-Krum geometry options: the Krum papers' form (``distance="squared"`` on the
``params``) and the MARS code's form (``distance="euclidean"`` on ``all`` leaves, BatchNorm
statistics included), against an independent numpy reference and hand-made federations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax.config import ConfigError, get_preset, validate
from marsjax.defenses import _krum

KEY = jax.random.key(0)
PAPER = {"distance": "squared", "layers": "params"}
MARS_CODE = {"distance": "euclidean", "layers": "all"}
FORMS = [
    pytest.param(PAPER, id="squared-params"),
    pytest.param(MARS_CODE, id="euclidean-all"),
    pytest.param({"distance": "euclidean", "layers": "params"}, id="euclidean-params"),
    pytest.param({"distance": "squared", "layers": "all"}, id="squared-all"),
]


def _run(defense, updates, weights=None, client_ids=None):
    n = jax.tree.leaves(updates)[0].shape[0]
    w = jnp.ones(n) if weights is None else jnp.asarray(weights, jnp.float32)
    gv = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), updates)
    fn = jax.jit(
        lambda u, w, ids: defense.apply(
            KEY, u, defense.init(gv), global_variables=gv, client_weights=w, client_ids=ids
        )
    )
    res, _ = fn(updates, w, client_ids)
    return res


def _random_tree(rng, n):
    """A stacked update with two parameter leaves and two BatchNorm statistics."""
    return {
        "params": {
            "conv": {"kernel": rng.normal(size=(n, 3, 3, 2)).astype(np.float32)},
            "fc": {"bias": rng.normal(size=(n, 4)).astype(np.float32)},
        },
        "batch_stats": {
            "bn": {
                "mean": (2.0 * rng.normal(size=(n, 2))).astype(np.float32),
                "var": (3.0 * rng.normal(size=(n, 2))).astype(np.float32),
            }
        },
    }


def _np_rows(tree, layers):
    """``[N, D]`` float64 rows of the chosen leaves (leaf order is irrelevant to distances)."""
    leaves = []
    for section, sub in tree.items():
        if layers == "params" and section != "params":
            continue
        leaves += [np.asarray(a, np.float64).reshape(a.shape[0], -1) for a in jax.tree.leaves(sub)]
    return np.concatenate(leaves, axis=1)


def np_multikrum(tree, f, distance, layers, weights=None, m=None):
    """Independent reference: scores (0 on dropped rows), accepted mask, aggregate rows."""
    x = _np_rows(tree, layers)
    n = len(x)
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    keep = np.flatnonzero((w > 0) & np.isfinite(x).all(1))
    xv = x[keep]
    nv = len(keep)
    d = np.sqrt(((xv[:, None] - xv[None]) ** 2).sum(-1))
    if distance == "squared":
        d = d**2
    k = max(nv - f - 2, 1)
    scores_v = np.array([np.sort(np.delete(d[i], i))[:k].sum() for i in range(nv)])
    m = max(nv - f, 1) if m is None else m
    chosen = keep[np.argsort(scores_v, kind="stable")[:m]]
    scores = np.zeros(n)
    scores[keep] = scores_v
    accepted = np.zeros(n)
    accepted[chosen] = 1.0
    return scores, accepted


def _mean_of(tree, accepted, weights=None):
    w = accepted * (np.ones(len(accepted)) if weights is None else np.asarray(weights))
    return jax.tree.map(lambda a: np.tensordot(w, np.nan_to_num(a), axes=1) / w.sum(), tree)


@pytest.mark.parametrize("form", FORMS)
def test_scores_and_selection_match_numpy(form):
    rng = np.random.default_rng(7)
    n, f = 10, 2
    tree = _random_tree(rng, n)
    # rows 3 (weight 0) and 6 (a NaN) are dropped: never selected, never neighbours
    tree["params"]["fc"]["bias"][6, 1] = np.nan
    w = np.ones(n)
    w[3] = 0.0
    for ids in (None, jnp.arange(n, dtype=jnp.int32)):
        res = _run(_krum.multi_krum(f, **form), tree, w, ids)
        scores, accepted = np_multikrum(tree, f, form["distance"], form["layers"], w)
        np.testing.assert_allclose(np.asarray(res.scores), scores, rtol=2e-5)
        np.testing.assert_array_equal(np.asarray(res.accepted), accepted)
        assert accepted[[3, 6]].sum() == 0 and accepted.sum() == (n - 2) - f
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6),
            res.update,
            _mean_of(tree, accepted, w),
        )
    # Krum shares the scoring: it keeps the lowest-scored valid row
    res = _run(_krum.krum(f, **form), tree, w)
    np.testing.assert_allclose(np.asarray(res.scores), scores, rtol=2e-5)
    best = np_multikrum(tree, f, form["distance"], form["layers"], w, m=1)[1]
    assert best.sum() == 1
    np.testing.assert_array_equal(np.asarray(res.accepted), best)


def test_the_two_forms_do_not_agree_on_these_random_rounds():
    # the option matters on ordinary data too (the reference decides; the selections differ)
    rng = np.random.default_rng(7)
    tree = _random_tree(rng, 10)
    a = np.asarray(_run(_krum.multi_krum(2, **PAPER), tree).accepted)
    b = np.asarray(_run(_krum.multi_krum(2, **MARS_CODE), tree).accepted)
    np.testing.assert_array_equal(a, np_multikrum(tree, 2, "squared", "params")[1])
    np.testing.assert_array_equal(b, np_multikrum(tree, 2, "euclidean", "all")[1])
    assert not np.array_equal(a, b)


def _line(points, bn=None):
    """Clients at 1-D positions (first coordinate of a parameter leaf); BN statistics ``bn``."""
    n = len(points)
    k = np.zeros((n, 3), np.float32)
    k[:, 0] = points
    bn = np.full((n, 2), 0.5, np.float32) if bn is None else np.asarray(bn, np.float32)
    return {"params": {"fc": {"kernel": k}}, "batch_stats": {"bn": {"var": bn}}}


def test_hand_made_round_where_the_forms_drop_different_clients():
    # Clients at 0, 1, 4, 8, 9 on a line; equal BN statistics (no distance from them).
    # n = 5, f = 1: each score sums the n - f - 2 = 2 nearest distances; m = n - f = 4 are kept,
    # i.e. the highest score is dropped.
    #   client (pos)  distances to the others   2 nearest   unsquared   squared
    #   0 (0)         1, 4, 8, 9                1, 4        5           1 + 16 = 17
    #   1 (1)         1, 3, 7, 8                1, 3        4           1 +  9 = 10
    #   2 (4)         4, 3, 4, 5                3, 4        7           9 + 16 = 25
    #   3 (8)         8, 7, 4, 1                1, 4        5           1 + 16 = 17
    #   4 (9)         9, 8, 5, 1                1, 5        6           1 + 25 = 26
    # Squared (papers): client 4 is dropped (26 > 25); the mean of 0, 1, 4, 8 is 3.25.
    # Unsquared (MARS code): client 2 is dropped (7 > 6); the mean of 0, 1, 8, 9 is 4.5.
    tree = _line([0, 1, 4, 8, 9])
    paper = _run(_krum.multi_krum(1, **PAPER), tree)
    code = _run(_krum.multi_krum(1, **MARS_CODE), tree)
    np.testing.assert_allclose(np.asarray(paper.scores), [17, 10, 25, 17, 26], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(code.scores), [5, 4, 7, 5, 6], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(paper.accepted), [1, 1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(code.accepted), [1, 1, 0, 1, 1])
    assert float(paper.update["params"]["fc"]["kernel"][0]) == pytest.approx(3.25, rel=1e-6)
    assert float(code.update["params"]["fc"]["kernel"][0]) == pytest.approx(4.5, rel=1e-6)
    # the distance alone decides here (BN statistics are equal): euclidean on params agrees
    alone = _run(_krum.multi_krum(1, distance="euclidean"), tree)
    np.testing.assert_array_equal(np.asarray(alone.accepted), [1, 1, 0, 1, 1])
    # Krum keeps client 1 in both forms (lowest score: 10 and 4)
    for form in (PAPER, MARS_CODE):
        np.testing.assert_array_equal(
            np.asarray(_run(_krum.krum(1, **form), tree).accepted), [0, 1, 0, 0, 0]
        )


def test_bn_statistics_count_in_the_mars_code_form_only():
    # Parameters as in the hand-made round; client 1 (the best-scored one in both forms) gets
    # running statistics far from everyone else's.
    pos = [0, 1, 4, 8, 9]
    same = _line(pos)
    bn = np.full((5, 2), 0.5, np.float32)
    bn[1] = [40.5, -29.5]  # exactly 50 away from the others' statistics (0.5, 0.5)
    odd = _line(pos, bn)
    for form in (PAPER, {"distance": "euclidean", "layers": "params"}):
        a, b = _run(_krum.multi_krum(1, **form), same), _run(_krum.multi_krum(1, **form), odd)
        np.testing.assert_array_equal(np.asarray(a.scores), np.asarray(b.scores))
        np.testing.assert_array_equal(np.asarray(a.accepted), np.asarray(b.accepted))
        assert float(b.accepted[1]) == 1.0
    # MARS code form: client 1 now sits >= 50 from everyone (score >= 100) and is dropped; the
    # others lose client 1 as a neighbour: 0 (0): 4 + 8 = 12; 2 (4): 4 + 4 = 8; 3 (8): 1 + 4 = 5;
    # 4 (9): 1 + 5 = 6. So client 2, dropped without the BN offset, is kept.
    code = _run(_krum.multi_krum(1, **MARS_CODE), odd)
    scores, accepted = np_multikrum(odd, 1, "euclidean", "all")
    np.testing.assert_allclose(np.asarray(code.scores), scores, rtol=1e-5)
    assert float(code.scores[1]) > 100.0
    np.testing.assert_array_equal(np.asarray(code.accepted), [1, 0, 1, 1, 1])
    np.testing.assert_array_equal(accepted, [1, 0, 1, 1, 1])


def test_unsquared_distances_survive_a_squared_overflow():
    # clients at 0, 3e19, -3e19, 1: distances of 3e19 and 6e19 are finite in float32, their
    # squares (9e38, 3.6e39) are not. n = 4, f = 0: the 2 nearest, m = 2.
    #   client (pos)  2 nearest          unsquared score   squared score
    #   0 (0)         1, 3e19            3e19              1 + inf = inf
    #   1 (3e19)      3e19 - 1, 3e19     6e19              inf
    #   2 (-3e19)     3e19, 3e19 + 1     6e19              inf
    #   3 (1)         1, 3e19 - 1        3e19              inf
    tree = _line([0.0, 3e19, -3e19, 1.0])
    code = _run(_krum.multi_krum(0, num_selected=2, distance="euclidean"), tree)
    np.testing.assert_allclose(np.asarray(code.scores), [3e19, 6e19, 6e19, 3e19], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(code.accepted), [1, 0, 0, 1])
    # the squared form saturates every score (reported as the float32 max) and falls back on the
    # client index for the tie
    paper = _run(_krum.multi_krum(0, num_selected=2), tree)
    np.testing.assert_array_equal(np.asarray(paper.scores), np.finfo(np.float32).max)
    np.testing.assert_array_equal(np.asarray(paper.accepted), [1, 1, 0, 0])


def test_dropped_rows_never_take_a_place_even_when_valid_scores_overflow():
    # f = 0, row 0 dropped (weight 0); the 3 valid rows are 3e19 apart, so every valid squared
    # score is +inf, like the dropped row's. All m = 3 valid rows must still be selected.
    tree = _line([5.0, 0.0, 3e19, -3e19])
    res = _run(_krum.multi_krum(0), tree, weights=[0, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(res.accepted), [0, 1, 1, 1])
    assert np.isfinite(np.asarray(res.scores)).all()


class _Probe:
    """A context that must not be touched: option checks come first."""

    def __getattr__(self, name):
        raise AssertionError(f"the context was used ({name}) before the options were checked")


@pytest.mark.parametrize("builder", [_krum._build_multikrum, _krum._build_krum])
@pytest.mark.parametrize(
    "options",
    [
        {"distance": "official"},
        {"distance": "sq"},
        {"layers": "bn"},
        {"layers": []},
        {"layers": [""]},
        {"layers": 3},
        {"num_byzantine": -1},
        {"num_byzantine": 2.5},
        {"num_byzantine": True},
    ],
)
def test_builders_reject_bad_values_before_using_the_context(builder, options):
    # ValueError for a bad value, TypeError for a bad type: the config validation reports both
    with pytest.raises((ValueError, TypeError), match=next(iter(options))):
        builder(_Probe(), **options)


def test_builders_check_num_selected_and_accept_good_values():
    with pytest.raises(ValueError, match="num_selected"):
        _krum._build_multikrum(_Probe(), num_selected=0)
    d = _krum._build_multikrum(_Probe(), num_byzantine=4, layers="all", distance="euclidean")
    assert callable(d.apply)
    d = _krum._build_krum(_Probe(), num_byzantine=1, layers=["fc"], distance="squared")
    assert callable(d.apply)


def test_validate_rejects_a_bad_distance_naming_the_field():
    cfg = get_preset("demo")
    good = dataclasses.replace(cfg.defense, name="multikrum", options=dict(MARS_CODE))
    validate(dataclasses.replace(cfg, defense=good))
    bad = dataclasses.replace(good, options={"distance": "official"})
    with pytest.raises(ConfigError, match="defense.options.*distance"):
        validate(dataclasses.replace(cfg, defense=bad))
