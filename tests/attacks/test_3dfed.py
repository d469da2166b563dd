"""3DFed: each module on hand-worked inputs, then the composed ``craft`` over a feedback loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax import simulation
from marsjax.attacks import _3dfed_components as C
from marsjax.attacks._3dfed import find_layers, get_path, set_path
from marsjax.attacks.base import CraftContext
from marsjax.config import get_preset, override
from marsjax.data import load_dataset

A, R, CL, NO = C.ACCEPTED, C.REJECTED, C.CLIPPED, C.NONE


# ------------------------------------------------------------------------------------------------
# Indicator feedback -> status


def test_indicator_feedback_hand_worked():
    g = jnp.array([0.0, 0.5, -0.2, 0.0, 1e-7, 0.3])
    positions = jnp.array([1, 2, 4, 5, 0])
    values = jnp.array([5.0, 2.0, 1e-2, 0.3, 0.0])
    fb = C.indicator_feedback(g, positions, values)
    np.testing.assert_allclose(np.asarray(fb), [0.1, -0.1, 1e-5, 1.0, 0.0], rtol=1e-5)


def test_indicator_status_accept_clip_reject():
    fb = jnp.array([0.10, 0.05, 0.0, 0.085, 0.3])
    up = jnp.array([True, True, True, True, False])
    status, weak = C.indicator_status(fb, up, 1e-5)
    # max over uploaded = 0.1 -> clipped iff 1e-5 < fb <= 0.08
    assert np.asarray(status).tolist() == [A, CL, R, A, NO]
    assert not bool(weak)


@pytest.mark.parametrize(
    "fb, weak, first",
    [
        ([0.1, 1.5], True, None),  # > 1: noise added by the server
        ([0.1, -1e-4], True, None),  # < -threshold
        ([0.1, -1e-6], False, R),  # slightly negative: just rejected
        ([0.1, 1e-5], False, R),  # == threshold: rejected
    ],
)
def test_indicator_status_weak_dp(fb, weak, first):
    status, w = C.indicator_status(jnp.array(fb), jnp.array([True, True]), 1e-5)
    assert bool(w) == weak
    if first is not None:
        assert int(status[1]) == first


def test_indicator_status_ignores_slots_not_uploaded():
    status, weak = C.indicator_status(jnp.array([0.1, 7.0]), jnp.array([True, False]), 1e-5)
    assert not bool(weak)
    assert np.asarray(status).tolist() == [A, NO]


# ------------------------------------------------------------------------------------------------
# Tuning


@pytest.mark.parametrize(
    "k, att, dec, cap, expected",
    [
        (0, [R, R], [NO, NO], 4, 1),  # nobody got through: one more decoy
        (2, [R, R], [A, R], 4, 1),  # a decoy accepted: one fewer, no increment
        (2, [CL, R], [R, R], 4, 2),  # an attacker clipped: unchanged
        (2, [R, NO], [R, R], 2, 2),  # capped
        (1, [A, A], [A, NO], 4, 0),  # accepted decoy removed
        (3, [R, R], [A, A], 4, 1),
    ],
)
def test_tune_decoys(k, att, dec, cap, expected):
    out = C.tune_decoys(jnp.int32(k), jnp.array(att), jnp.array(dec), cap)
    assert int(out) == expected


def _alphas(status, alpha, group_of, n=200, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    f = jax.jit(
        jax.vmap(
            lambda k: C.tune_alpha(
                k, jnp.array(alpha), jnp.array(status), jnp.array(group_of), **kw
            )
        )
    )
    return np.asarray(f(keys))


def test_tune_alpha_all_groups_candidates():
    out = _alphas([A, A, A, A], [0.6, 0.3], [0, 0, 1, 1])
    assert out.min() >= 0.3 - 1e-6 and out.max() <= 0.6 + 1e-6
    assert out.std() > 0.05


def test_tune_alpha_some_groups_candidates():
    out = _alphas([R, R, A, A], [0.6, 0.3], [0, 0, 1, 1])
    assert out.min() >= 0.3 - 1e-6 and out.max() <= 0.4 + 1e-6


def test_tune_alpha_no_candidate_draws_from_noise_mask_alpha():
    out = _alphas([R, A, R, R], [0.6, 0.3], [0, 0, 1, 1], alpha_low=0.5)
    assert out.min() >= 0.5 - 1e-6 and out.max() <= 0.99 + 1e-6
    # only one active group and no candidate: U(0, 1) regardless of alpha_low
    out1 = _alphas([R, R, NO, NO], [0.6, 0.3], [0, 0, 1, 1], alpha_low=0.5)
    assert out1.min() < 0.4 and out1.min() >= 0.01 - 1e-6


def test_tune_alpha_candidate_ratio_80_percent():
    group = [0] * 5 + [1] * 5
    # group 0: 4 of 5 accepted (80%): candidate; group 1: 3 of 5: not
    out = _alphas([A, A, A, A, R, A, A, A, R, R], [0.2, 0.7], group)
    assert out.min() >= 0.2 - 1e-6 and out.max() <= 0.3 + 1e-6


def test_tune_alpha_single_candidate_keeps_value_and_clamps():
    out = _alphas([A, A], [0.42], [0, 0])
    np.testing.assert_allclose(out, 0.42, atol=1e-6)
    out = _alphas([A, A], [0.999], [0, 0])
    np.testing.assert_allclose(out, 0.99, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Norm matching


@pytest.mark.parametrize(
    "ben, bd, expected", [(10.0, 1.0, 5.0), (3.0, 1.0, 3.0), (1.0, 3.0, 1.0), (0.0, 0.0, 1.0)]
)
def test_norm_match_scale(ben, bd, expected):
    assert float(C.norm_match_scale(jnp.float32(ben), jnp.float32(bd), 5.0)) == pytest.approx(
        expected
    )


def test_norm_matching_bound_on_random_updates():
    rng = np.random.default_rng(0)
    for _ in range(20):
        bd = rng.normal(size=50) * rng.uniform(0.01, 2)
        ben = rng.normal(size=50) * rng.uniform(0.01, 2)
        s = float(C.norm_match_scale(np.linalg.norm(ben), np.linalg.norm(bd), 5.0))
        scaled = np.linalg.norm(s * bd)
        # never shrunk, never above 5x, and equal to the benign norm whenever that is reachable
        assert np.linalg.norm(bd) * (1 - 1e-5) <= scaled <= 5 * np.linalg.norm(bd) * (1 + 1e-5)
        if np.linalg.norm(bd) <= np.linalg.norm(ben) <= 5 * np.linalg.norm(bd):
            assert scaled == pytest.approx(np.linalg.norm(ben), rel=1e-4)


# ------------------------------------------------------------------------------------------------
# Indicator positions


def test_indicator_positions_from_constructed_curvature():
    p = 20
    perm = np.random.default_rng(1).permutation(p)
    analog = np.empty(p, np.float32)
    analog[perm] = np.arange(p) * 0.1 + 0.05  # position perm[0] has the smallest analog
    curv = np.full(p, 5.0, np.float32)
    cands = perm[:6]  # num_candidate 3 * num_needed 2 smallest analogs
    curv[cands[4]] = 0.0
    curv[cands[1]] = 0.0  # both zero: cands[1] first (smaller analog)
    curv[cands[3]] = -1e-3  # then the smallest |curvature|
    curv[cands[0]] = 2.0
    curv[perm[10]] = 0.0  # zero curvature but not a candidate: never chosen
    out = C.choose_indicator_positions(
        jnp.asarray(analog), jnp.asarray(curv), jnp.int32(2), num_candidate=3, max_positions=4
    )
    out = np.asarray(out)
    assert out[:4].tolist() == [cands[1], cands[4], cands[3], cands[0]]
    assert perm[10] not in out


def test_layer_curvature_is_hessian_row_sum():
    a = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, -1.0], [0.0, -1.0, 4.0]])
    b = jnp.array([1.0, -2.0, 0.5])

    def loss(w):
        return 0.5 * w @ a @ w + b @ w + jnp.sum(w**3) / 6.0

    w = jnp.array([0.5, -1.0, 2.0])
    # H = A + diag(w)  ->  H 1 = A 1 + w
    np.testing.assert_allclose(
        np.asarray(C.layer_curvature(loss, w)), np.asarray(a.sum(1) + w), rtol=1e-6
    )


# ------------------------------------------------------------------------------------------------
# Noise masks


_choose_neurons = jax.jit(C.choose_neurons, static_argnums=(1, 2, 3, 4))
_init_masks = jax.jit(C.init_noise_masks, static_argnums=(4, 5, 6))
_objective = jax.jit(C.noise_mask_objective, static_argnames=("ups_coef",))


def _optimize(*args, **kw):
    return jax.jit(C.optimize_noise_masks, static_argnums=(7,), static_argnames=tuple(kw))(
        *args, **kw
    )


@pytest.fixture(scope="module")
def mask_problem():
    key = jax.random.key(3)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    a, fan_in, out, groups = 6, 16, 10, 2
    group_of = jnp.array([0, 0, 0, 1, 1, 1])
    neurons = _choose_neurons(k1, groups, out, 5, 8)
    nm = neurons[group_of]
    member = jnp.ones((a,), bool)
    dw = 0.05 * jax.random.normal(k2, (fan_in, out))
    db = 0.05 * jax.random.normal(k3, (out,))
    masks = _init_masks(k4, nm, member, group_of, fan_in, 0.05, groups)
    return {
        "masks": masks,
        "dw": dw,
        "db": db,
        "nm": nm,
        "member": member,
        "group_of": group_of,
        "groups": groups,
        "neurons": neurons,
        "alpha": jnp.full((a,), 0.5),
    }


def _group_sum_ratio(masks, group_of, groups):
    mw, mb = (np.asarray(m) for m in masks)
    flat = np.concatenate([mw.reshape(len(mw), -1), mb], 1)
    ratios = []
    for g in range(groups):
        rows = flat[np.asarray(group_of) == g]
        ratios.append(np.linalg.norm(rows.sum(0)) / np.linalg.norm(rows, axis=1).sum())
    return max(ratios)


def test_choose_neurons_excludes_target():
    n = np.asarray(_choose_neurons(jax.random.key(0), 50, 10, 5, 8))
    assert (n.sum(1) == 5).all() and not n[:, 8].any()
    n = np.asarray(_choose_neurons(jax.random.key(0), 5, 10, 20, 0))
    assert (n.sum(1) == 9).all() and not n[:, 0].any()


def test_noise_masks_initial_group_sum_is_zero(mask_problem):
    mp = mask_problem
    assert _group_sum_ratio(mp["masks"], mp["group_of"], mp["groups"]) < 1e-6
    mw, mb = (np.asarray(m) for m in mp["masks"])
    off = ~np.asarray(mp["nm"])
    assert np.all(mw[:, :, :][np.broadcast_to(off[:, None, :], mw.shape)] == 0)
    assert np.all(mb[off] == 0)


def test_noise_masks_of_a_group_cancel_after_optimisation(mask_problem):
    mp = mask_problem
    args = (mp["masks"], mp["dw"], mp["db"], mp["nm"], mp["member"], mp["group_of"], mp["alpha"])
    (mw, mb), lam = _optimize(*args, mp["groups"], ups_coef=1e-3)
    ratio = _group_sum_ratio((mw, mb), mp["group_of"], mp["groups"])
    # without the Lagrangian the UPs term pushes the members the same way
    free, _ = _optimize(
        *args, mp["groups"], ups_coef=1e-3, lag_coef=0.0, lagrange_step=0.0, lam0=0.0
    )
    ratio_free = _group_sum_ratio(free, mp["group_of"], mp["groups"])
    assert ratio < 0.05, ratio
    assert ratio_free > 3 * ratio
    assert np.all(np.asarray(lam) >= 1.0)
    # the masks moved (UPs did something) and stay on the chosen neurons only
    assert np.abs(np.asarray(mw) - np.asarray(mp["masks"][0])).max() > 1e-4
    off = ~np.asarray(mp["nm"])
    assert np.all(np.asarray(mb)[off] == 0)


def test_noise_mask_objective_increases_update_magnitude(mask_problem):
    mp = mask_problem
    args = (mp["dw"], mp["db"], mp["nm"], mp["member"], mp["group_of"], mp["alpha"])
    lam = jnp.ones((mp["groups"],))
    before = _objective(mp["masks"], *args, lam, ups_coef=1e-3)
    after_masks, _ = _optimize(mp["masks"], *args, mp["groups"], ups_coef=1e-3)
    after = _objective(after_masks, *args, lam, ups_coef=1e-3)
    assert float(after) < float(before)


def test_non_members_get_no_mask(mask_problem):
    mp = mask_problem
    member = jnp.array([True, True, False, True, True, True])
    masks = _init_masks(jax.random.key(9), mp["nm"], member, mp["group_of"], 16, 0.05, 2)
    (mw, mb), _ = _optimize(
        masks, mp["dw"], mp["db"], mp["nm"], member, mp["group_of"], mp["alpha"], 2
    )
    assert np.all(np.asarray(mw)[2] == 0) and np.all(np.asarray(mb)[2] == 0)
    # the two remaining members of group 0 still cancel at initialisation
    s = np.asarray(masks[0])[:2].sum(0)
    assert np.abs(s).max() < 1e-6


# ------------------------------------------------------------------------------------------------
# Implanting and decoys


def test_implant_value():
    out = C.implant_value(jnp.array([2e-6, 0.0, -3e-6]), 1e5, 1e-3)
    np.testing.assert_allclose(np.asarray(out), [0.2, 1e-3, -0.3], rtol=1e-5)


def test_decoy_positions_and_loss():
    bd = jnp.array([[0.5, 0.1], [0.3, -0.2]])
    ben = jnp.array([[0.0, 0.1], [0.29, 0.3]])
    assert np.asarray(C.decoy_positions(bd, ben, 2)).tolist() == [1, 2]
    assert float(C.decoy_param_loss(jnp.float32(3.0), jnp.float32(0.0))) == pytest.approx(-30.0)
    assert float(C.decoy_param_loss(jnp.float32(11.0), jnp.float32(0.0))) == pytest.approx(1.1e-9)
    # the gradient pushes the parameter away from the reference while within the limit
    assert float(jax.grad(C.decoy_param_loss)(jnp.float32(0.5), jnp.float32(0.0))) < 0


def test_find_layers_generic():
    from marsjax.models import build_model

    x = jnp.zeros((1, 32, 32, 3))
    params = jax.eval_shape(build_model("resnet18", 10).init, jax.random.key(0), x)["params"]
    lay = find_layers(params)
    assert lay["indicator"] == ("layer4_1", "conv2", "kernel")
    assert lay["output"] == ("fc", "kernel") and lay["output_bias"] == ("fc", "bias")
    assert lay["decoy"] == ("fc", "kernel")
    p2 = jax.eval_shape(
        build_model("simplenet", 10, width="small").init, jax.random.key(0), x[:, :8, :8, :1]
    )
    lay = find_layers(p2["params"])
    assert lay["indicator"] == ("conv2", "kernel") and lay["output"] == ("fc2", "kernel")
    assert lay["decoy"] == ("fc1", "kernel")
    with pytest.raises(ValueError, match="indicator_layer"):
        find_layers(p2["params"], indicator="conv9/kernel")
    # the factory checks the layers when the experiment is built (a config error, not a trace one)
    cfg = override(
        get_preset("demo"),
        {"attack.name": "3dfed", "attack.options": {"decoy_layer": "fc9/kernel"}},
    )
    with pytest.raises(ValueError, match="attack.options.decoy_layer"):
        simulation.build(cfg, load_dataset("digits"))


# ------------------------------------------------------------------------------------------------
# The composed craft over a feedback loop (hand-made global models)

OPTS = {
    "poison_steps": 3,
    "curvature_batches": 1,
    "mask_steps": 5,
    "max_decoys": 2,
    "ups_coef": 1e-3,
    "indicator_scale": 1e3,
    "indicator_threshold": 1e-3,
}
IDS = [0, 1, 10, 11, 29, 28, 12, 13, 14, 15]  # attackers 0, 1; decoy slots are ids 29, 28


@pytest.fixture(scope="module")
def loop():
    ds = load_dataset("digits")
    cfg = override(get_preset("demo"), {"attack.name": "3dfed", "attack.options": dict(OPTS)})
    sim = simulation.build(cfg, ds)
    g = sim.init_state().global_variables
    ids = jnp.array(IDS, jnp.int32)
    mal = ids < cfg.attack.num_attackers
    # benign rows upload 0 (so the feedback is exact); attacker rows hold a benign reference
    ref = jax.tree.map(lambda x: 1e-2 * jax.random.normal(jax.random.key(1), x.shape), g)
    updates = jax.tree.map(
        lambda r: jnp.where(mal.reshape((-1,) + (1,) * r.ndim), r[None], 0.0), ref
    )
    ctx = CraftContext(g, jnp.int32(0), ids, mal, sim.data, sim.data.counts[ids])
    craft = jax.jit(sim.attack.craft)
    out1, s1 = craft(jax.random.key(2), updates, sim.attack.init(g), ctx)
    lay = find_layers(g["params"])
    return {
        "sim": sim,
        "g": g,
        "ids": ids,
        "mal": mal,
        "updates": updates,
        "craft": craft,
        "out1": out1,
        "s1": s1,
        "lay": lay,
        "ctx": ctx,
    }


def _next_global(g, out, weights):
    w = jnp.asarray(weights, jnp.float32)
    return jax.tree.map(lambda p, u: p + jnp.tensordot(w, u, axes=1) / len(weights), g, out)


def _round2(lp, weights, noise=0.0):
    g1 = _next_global(lp["g"], lp["out1"], weights)
    if noise:
        g1 = jax.tree.map(lambda p: p + noise * jax.random.normal(jax.random.key(5), p.shape), g1)
    ctx = lp["ctx"]._replace(global_variables=g1, round=jnp.int32(1))
    out2, s2 = lp["craft"](jax.random.key(4), lp["updates"], lp["s1"], ctx)
    return g1, out2, s2


def test_first_round_uploads(loop):
    out1, s1, mal = loop["out1"], loop["s1"], np.asarray(loop["mal"])
    ind = ("params",) + loop["lay"]["indicator"]
    flat = np.asarray(get_path(out1, ind)).reshape(len(IDS), -1)
    # benign rows untouched; the two attackers upload different rows (masks + indicators)
    for leaf in jax.tree.leaves(out1):
        assert np.all(np.asarray(leaf)[~mal] == 0)
    assert not np.allclose(flat[0], flat[1])
    vals, pos, up = np.asarray(s1.values), np.asarray(s1.positions), np.asarray(s1.uploaded)
    assert up[:2].all() and not up[2:].any()
    assert pos[0] != pos[1]
    np.testing.assert_allclose([flat[0, pos[0]], flat[1, pos[1]]], vals[:2], rtol=1e-6)
    assert int(s1.num_decoys) == 0 and int(s1.attack_rounds) == 1
    assert 0.01 <= float(s1.alpha.min()) and float(s1.alpha.max()) <= 0.99
    assert float(s1.scale) >= 1.0


def test_feedback_accepted_under_fedavg(loop):
    _, _, s2 = _round2(loop, [1.0] * 10)
    assert np.asarray(s2.status)[:2].tolist() == [A, A]
    np.testing.assert_allclose(np.asarray(s2.feedback)[:2], 0.1, rtol=5e-3)
    assert not bool(s2.weak_dp) and int(s2.num_decoys) == 0


def test_feedback_clipped(loop):
    _, _, s2 = _round2(loop, [1.0, 0.5] + [1.0] * 8)
    assert np.asarray(s2.status)[:2].tolist() == [A, CL]


def test_rejection_adds_a_decoy_in_a_benign_slot(loop):
    g1, out2, s2 = _round2(loop, [0.0, 0.0] + [1.0] * 8)
    assert np.asarray(s2.status)[:2].tolist() == [R, R]
    assert int(s2.num_decoys) == 1 and not bool(s2.weak_dp)
    # decoy 0 is written into client N-1 = 29's row (row 4), which stays benign
    dec_row = IDS.index(29)
    assert not bool(loop["mal"][dec_row])
    drow = np.concatenate([np.asarray(x)[dec_row].ravel() for x in jax.tree.leaves(out2["params"])])
    assert np.abs(drow).max() > 1.0  # the pushed decoy parameter
    other = IDS.index(28)  # decoy slot 1 is not used (k = 1)
    assert all(np.all(np.asarray(x)[other] == 0) for x in jax.tree.leaves(out2))
    up = np.asarray(s2.uploaded)
    a_slots = len(up) - 2
    assert up[a_slots] and not up[a_slots + 1]
    # next round: only the decoy's indicator moves (decoy accepted, attackers not) -> k back to 0
    ind = ("params",) + loop["lay"]["indicator"]
    flat = np.asarray(get_path(g1, ind)).reshape(-1).copy()
    p, v = int(np.asarray(s2.positions)[a_slots]), float(np.asarray(s2.values)[a_slots])
    flat[p] += v / 10
    g2 = set_path(g1, ind, jnp.asarray(flat.reshape(get_path(g1, ind).shape)))
    ctx = loop["ctx"]._replace(global_variables=g2)
    _, s3 = loop["craft"](jax.random.key(6), loop["updates"], s2, ctx)
    assert np.asarray(s3.status)[: a_slots + 1].tolist()[:2] == [R, R]
    assert int(np.asarray(s3.status)[a_slots]) == A
    assert int(s3.num_decoys) == 0


def test_weak_dp_switch(loop):
    _, _, s2 = _round2(loop, [1.0] * 10, noise=1.0)
    assert bool(s2.weak_dp)
    np.testing.assert_allclose(np.asarray(s2.alpha), 0.1)
    # sticky: even a clean FedAvg round afterwards keeps it
    ctx = loop["ctx"]._replace(global_variables=loop["g"])
    _, s3 = loop["craft"](jax.random.key(7), loop["updates"], s2, ctx)
    assert bool(s3.weak_dp)


def test_no_tuning_keeps_first_alpha_and_no_decoys(loop):
    """``use_tuning=False``: indicators are implanted and read back, but after a round in which
    both attackers were rejected ``α`` keeps its first draw and no decoy is added (the tuned
    attack, same inputs, redraws ``α`` and adds a decoy)."""
    ds = load_dataset("digits")
    cfg = override(
        get_preset("demo"),
        {"attack.name": "3dfed", "attack.options": {**OPTS, "use_tuning": False}},
    )
    sim = simulation.build(cfg, ds)
    craft = jax.jit(sim.attack.craft)
    ctx = loop["ctx"]
    out1, s1 = craft(jax.random.key(2), loop["updates"], sim.attack.init(loop["g"]), ctx)
    # round 1 is identical to the tuned attack's (nothing to tune yet)
    for a, b in zip(jax.tree.leaves(out1), jax.tree.leaves(loop["out1"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    g1 = _next_global(loop["g"], out1, [0.0, 0.0] + [1.0] * 8)
    ctx2 = ctx._replace(global_variables=g1, round=jnp.int32(1))
    _, s2 = craft(jax.random.key(4), loop["updates"], s1, ctx2)
    assert np.asarray(s2.status)[:2].tolist() == [R, R]  # the feedback is still read
    assert int(s2.num_decoys) == 0
    np.testing.assert_array_equal(np.asarray(s2.alpha), np.asarray(s1.alpha))
    _, _, s2_tuned = _round2(loop, [0.0, 0.0] + [1.0] * 8)
    assert int(s2_tuned.num_decoys) == 1
    assert not np.allclose(np.asarray(s2_tuned.alpha), np.asarray(s1.alpha))
