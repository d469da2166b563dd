"""CerP: trigger geometry, the official variant (default) and the distributed one, fine-tuning
constraints, per-attacker poisoned updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax import simulation
from marsjax.attacks import _cerp
from marsjax.attacks._cerp import CERP_VARIANTS, cerp_clamp_bounds, cerp_pieces
from marsjax.attacks.base import CraftContext
from marsjax.client import make_normalize
from marsjax.config import get_preset, override
from marsjax.data import load_dataset

IDS = [0, 1, 3, 10, 11, 12, 13, 14, 15, 29]  # attackers 0, 1, 3 (demo: ids 0..5 are attackers)
DIGITS_MEAN, DIGITS_STD = 0.3053, 0.3759  # marsjax's digits statistics


def test_pieces_official_geometry_and_small_images():
    p = cerp_pieces((28, 28, 1))
    assert p.shape == (4, 28, 28, 1) and (p.sum(axis=(1, 2, 3)) == 6).all()
    rows, cols = np.nonzero(p.any(0)[..., 0])
    assert set(rows.tolist()) == {0, 4}
    assert set(cols.tolist()) == set(range(6)) | set(range(9, 15))
    assert not (p.sum(0) > 1).any()  # disjoint
    s = cerp_pieces((8, 8, 1))
    assert (s.sum(axis=(1, 2, 3)) == 3).all()
    assert set(np.nonzero(s.any(0)[..., 0])[1].tolist()) == {0, 1, 2, 4, 5, 6}


def _digits16():
    """Digits on a 16x16 black canvas (rows 6-13): the official 24-pixel trigger fits, on black."""
    ds = load_dataset("digits")
    pad = ((0, 0), (6, 2), (4, 4), (0, 0))
    return ds._replace(x_train=np.pad(ds.x_train, pad), x_test=np.pad(ds.x_test, pad))


def _craft(opts, update_scale, seed, ds=None, record=False):
    """Two CerP ``craft`` calls on the demo federation (clients ``IDS``, random updates), the
    second from the first's state with the same inputs. With ``record``, the batches the attackers
    poison in the first call are recorded as ``(x, poisoned x, trigger pixels)``."""
    ds = ds if ds is not None else load_dataset("digits")
    cfg = override(get_preset("demo"), {"attack.name": "cerp", "attack.options": opts})
    records = []
    with pytest.MonkeyPatch.context() as mp:
        if record:
            original = _cerp._poison_batch

            def spy(x, y, pixels, mask, k, target):
                out = original(x, y, pixels, mask, k, target)
                jax.debug.callback(
                    lambda *a: records.append(tuple(np.asarray(v) for v in a)), x, out[0], pixels
                )
                return out

            mp.setattr(_cerp, "_poison_batch", spy)
        sim = simulation.build(cfg, ds)
        g = sim.init_state().global_variables
        ids = jnp.array(IDS, jnp.int32)
        mal = ids < cfg.attack.num_attackers
        updates = jax.tree.map(
            lambda x: update_scale * jax.random.normal(jax.random.key(seed), (len(IDS),) + x.shape),
            g,
        )
        ctx = CraftContext(g, jnp.int32(0), ids, mal, sim.data, sim.data.counts[ids])
        state0 = sim.attack.init(g)
        craft = jax.jit(sim.attack.craft)
        out, state1 = craft(jax.random.key(seed + 1), updates, state0, ctx)
        jax.effects_barrier()
        first = list(records)
        _, state2 = craft(jax.random.key(seed + 1), updates, state1, ctx)
    return {
        "sim": sim,
        "ds": ds,
        "updates": updates,
        "out": out,
        "state0": state0,
        "state": state1,
        "state2": state2,
        "mal": np.asarray(mal),
        "records": first,
        "poison_k": int(np.floor(cfg.attack.poison_fraction * cfg.train.batch_size)),
    }


@pytest.fixture(scope="module")
def official():
    return _craft({"poison_steps": 2}, 1e-3, 1, _digits16(), record=True)


@pytest.fixture(scope="module")
def distributed():
    opts = {"variant": "distributed", "poison_steps": 2, "trigger_radius": 0.5}
    return _craft(opts, 1e-3, 1, _digits16(), record=True)


def _rows(tree):
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], 1)


def _to_pixels(t, ds):
    return (np.asarray(t) * np.asarray(ds.std) + np.asarray(ds.mean)) * 255.0


@pytest.mark.parametrize("which", ["official", "distributed"])
def test_cerp_rows(which, official, distributed):
    setup = official if which == "official" else distributed
    r, before, mal = _rows(setup["out"]), _rows(setup["updates"]), setup["mal"]
    np.testing.assert_array_equal(r[~mal], before[~mal])
    assert np.all(np.isfinite(r))
    m = r[mal]
    # every attacker trained its own model: all different, all changed
    assert not np.allclose(m[0], m[1]) and not np.allclose(m[1], m[2])
    assert (np.abs(m - before[mal]).max(axis=1) > 1e-3).all()


def _written(rec, k):
    """Per poisoned image: ``[H, W]`` bool where the attacker's batch was stamped."""
    x, xs, _ = rec
    assert np.array_equal(xs[k:], x[k:].astype(np.float32))  # the rest of the batch is clean
    return (xs[:k] != x[:k]).any(axis=-1)


def test_official_every_attacker_stamps_the_full_trigger(official):
    full = cerp_pieces((16, 16, 1)).any(0)[..., 0]
    assert full.sum() == 24
    recs, k = official["records"], official["poison_k"]
    assert len(recs) == 3 * 2  # 3 attackers x 2 poison steps
    tuned = _to_pixels(official["state"].trigger, official["ds"])[..., 0]
    for rec in recs:
        written = _written(rec, k)
        assert (written == full[None]).all()  # all 24 pixels, nothing else, on every image
        np.testing.assert_allclose(rec[1][:k, full, 0], np.broadcast_to(tuned[full], (k, 24)), 1e-5)


def test_distributed_variant_gives_each_attacker_its_piece(distributed):
    pieces = cerp_pieces((16, 16, 1))[..., 0]
    recs, k = distributed["records"], distributed["poison_k"]
    assert len(recs) == 3 * 2
    used = []
    for rec in recs:
        written = _written(rec, k)
        match = [i for i in range(4) if (written == pieces[i][None]).all()]
        assert len(match) == 1  # exactly one 6-pixel piece on every poisoned image
        used.append(match[0])
    assert sorted(used) == [0, 0, 1, 1, 3, 3]  # attackers 0, 1, 3 -> pieces id mod 4


def test_official_tuning_restarts_from_the_initial_trigger(official, distributed):
    t0 = np.asarray(official["state0"].trigger)
    t1, t2 = np.asarray(official["state"].trigger), np.asarray(official["state2"].trigger)
    assert np.abs(t1 - t0).max() > 1e-4  # tuning moved it
    # Round 2 (same global model and data) ignores round 1's tuning: the same tuned trigger.
    np.testing.assert_allclose(t2, t1, rtol=0, atol=1e-6)
    # The distributed variant continues from round 1's trigger instead.
    d1, d2 = np.asarray(distributed["state"].trigger), np.asarray(distributed["state2"].trigger)
    assert np.abs(d2 - d1).max() > 1e-4
    assert int(official["state2"].attack_rounds) == 2


def test_official_test_trigger_is_the_initial_trigger(official):
    sim, state, ds = official["sim"], official["state"], official["ds"]
    x = jnp.asarray(ds.x_test[:4])
    stamped = np.asarray(sim.attack.trigger(x, state))
    full = cerp_pieces(ds.image_shape).any(0)[..., 0]
    np.testing.assert_allclose(stamped[:, full], 255.0, atol=1e-3)  # white, as initialised
    np.testing.assert_array_equal(stamped[:, ~full], np.asarray(x)[:, ~full])
    tuned = _to_pixels(state.trigger, ds)[..., 0]
    assert np.abs(tuned[full] - 255.0).max() > 0.1  # the tuned one differs


def test_distributed_tuning_within_radius_and_clamp_and_tested(distributed):
    t0, t = np.asarray(distributed["state0"].trigger), np.asarray(distributed["state"].trigger)
    full = np.broadcast_to(cerp_pieces((16, 16, 1)).any(0), t.shape)
    assert int(distributed["state"].attack_rounds) == 1
    assert np.linalg.norm(t - t0) <= 0.5 + 1e-4
    assert np.abs(t - t0).max() > 1e-4  # it moved
    assert t.min() >= -2.0 and t.max() <= 2.0
    np.testing.assert_array_equal(t[~full], t0[~full])
    # the test images carry the whole tuned trigger
    ds = distributed["ds"]
    x = jnp.asarray(ds.x_test[:4])
    stamped = np.asarray(distributed["sim"].attack.trigger(x, distributed["state"]))[..., 0]
    f = full[..., 0]
    np.testing.assert_allclose(
        stamped[:, f], np.broadcast_to(_to_pixels(t, ds)[..., 0][f], stamped[:, f].shape), 1e-5
    )
    np.testing.assert_array_equal(stamped[:, ~f], np.asarray(x)[..., 0][:, ~f])


def test_clamp_bounds_hand_worked():
    norm1 = make_normalize((DIGITS_MEAN,), (DIGITS_STD,))
    assert cerp_clamp_bounds("official", norm1, 1) == (-3.0, 3.0)  # the official MNIST constants
    norm3 = make_normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    assert cerp_clamp_bounds("official", norm3, 3) == (-2.0, 2.0)  # every other task
    lo, hi = cerp_clamp_bounds("pixels", norm1, 1)
    # (0 - 0.3053) / 0.3759 = -0.81218, (1 - 0.3053) / 0.3759 = 1.84810
    np.testing.assert_allclose(lo, [-0.81218], atol=1e-5)
    np.testing.assert_allclose(hi, [1.84810], atol=1e-5)
    lo, hi = cerp_clamp_bounds("pixels", norm3, 3)
    # CIFAR-10 red: (0 - 0.4914) / 0.2023 = -2.42907, (1 - 0.4914) / 0.2023 = 2.51409
    np.testing.assert_allclose([lo[0], hi[0]], [-2.42907, 2.51409], atol=1e-4)
    assert cerp_clamp_bounds((-1, 1), norm1, 1) == (-1.0, 1.0)
    for bad in ("pixel", (1.0, -1.0), 3.0):
        with pytest.raises(ValueError, match="trigger_clamp"):
            cerp_clamp_bounds(bad, norm1, 1)


@pytest.mark.parametrize(
    ("variant", "want_state", "want_test"),
    [
        # official: the clamp acts on the tuned trigger only; the initial one stays white:
        # (1 - 0.3053) / 0.3759 = 1.84810 -> 255
        ("official", 1.84810, 255.0),
        # distributed: the initial trigger is clamped too: 1.0 -> (1.0 * 0.3759 + 0.3053) * 255
        ("distributed", 1.0, 173.706),
    ],
)
def test_initial_trigger_is_clamped_only_by_the_distributed_variant(variant, want_state, want_test):
    ds = load_dataset("digits")
    opts = {"variant": variant, "trigger_clamp": (-1.0, 1.0)}
    sim = simulation.build(
        override(get_preset("demo"), {"attack.name": "cerp", "attack.options": opts}), ds
    )
    state = sim.attack.init(sim.init_state().global_variables)
    full = cerp_pieces(ds.image_shape).any(0)[..., 0]
    np.testing.assert_allclose(np.asarray(state.trigger)[full, 0], want_state, atol=1e-4)
    stamped = np.asarray(sim.attack.trigger(jnp.asarray(ds.x_test[:2]), state))
    np.testing.assert_allclose(stamped[:, full, 0], want_test, atol=1e-2)


def test_official_clamp_bounds_the_tuned_trigger():
    # A huge step throws the tuned values far out; the official clamp on one-channel data is
    # [-3, 3] (not [-2, 2], not the pixel range [-0.812, 1.848]).
    opts = {"poison_steps": 1, "trigger_step": 1e4, "trigger_radius": 1e6}
    r = _craft(opts, 1e-3, 5)
    t = np.asarray(r["state"].trigger)[..., 0]
    full = cerp_pieces(r["ds"].image_shape).any(0)[..., 0]
    assert t.min() >= -3.0 and t.max() <= 3.0
    assert np.isin(t[full], [-3.0, 3.0]).any()  # some value sits exactly on a bound
    assert np.abs(t[full]).max() > 2.0
    np.testing.assert_array_equal(t[~full], np.asarray(r["state0"].trigger)[..., 0][~full])


def _flat(t):
    return np.concatenate([np.ravel(t["a"]), np.ravel(t["b"])])


def test_cosine_sums_match_the_definitions():
    rng = np.random.default_rng(0)

    def tree():
        return {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}

    theta, g = tree(), tree()
    deltas = [tree(), tree()]
    for term in ("layers", "update"):
        dir_sum = jax.tree.map(jnp.zeros_like, theta)
        for d in deltas:
            step = _cerp._direction(jax.tree.map(jnp.asarray, d), term == "layers")
            dir_sum = jax.tree.map(jnp.add, dir_sum, step)
        got = float(_cerp._cos_sum(theta, g, dir_sum, term))

        def cos(u, v):
            u, v = np.ravel(u), np.ravel(v)
            return u @ v / np.linalg.norm(u) / np.linalg.norm(v)

        if term == "layers":  # Σ_i mean_l cos(θ_l, Δ_il): parameters, not the update
            want = sum(np.mean([cos(theta[k], d[k]) for k in ("a", "b")]) for d in deltas)
        else:  # Σ_i cos(θ - θ_G, Δ_i) over all parameters
            want = sum(cos(_flat(theta) - _flat(g), _flat(d)) for d in deltas)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_all_attackers_data_pools_every_attacker_of_the_federation():
    sim = simulation.build(
        override(get_preset("demo"), {"attack.name": "cerp"}), load_dataset("digits")
    )
    d = sim.data
    idx, count = _cerp._all_attackers_data(d, 6)
    counts = np.asarray(d.counts)
    assert int(count) == counts[:6].sum()
    want = np.concatenate([np.asarray(d.indices)[i, : counts[i]] for i in range(6)])
    np.testing.assert_array_equal(np.asarray(idx)[: int(count)], want)


def test_variants_resolve_their_options(monkeypatch):
    seen = []
    original = _cerp.make_backdoor_trainer

    def spy(ctx, loss_fn, **kw):
        seen.append(kw["lr"])
        return original(ctx, loss_fn, **kw)

    monkeypatch.setattr(_cerp, "make_backdoor_trainer", spy)
    ds = load_dataset("digits")
    cfg = get_preset("demo")  # benign lr 0.05
    for opts in ({}, {"variant": "distributed"}, {"lr": 0.2}):
        simulation.build(override(cfg, {"attack.name": "cerp", "attack.options": opts}), ds)
    assert seen == [cfg.train.lr, 0.055, 0.2]  # official: the task's (benign) optimizer
    assert CERP_VARIANTS["official"]["distributed"] is False
    assert CERP_VARIANTS["distributed"]["distributed"] is True


@pytest.mark.parametrize("start", ["global", "normal"])
def test_poisoned_training_starts_where_asked(start):
    # With a vanishing learning rate poisoned training does not move the parameters, so the
    # uploaded parameter update is what the start point was: 0 from the global model, the
    # attacker's normal update from its normally trained model. Benign rows are never touched.
    # (The cosine term is off: its gradient grows as 1/||θ - θ_G||, which a step of 1e-12 from
    # θ_G makes huge.)
    opts = {"poison_steps": 2, "lr": 1e-12, "trigger_passes": 0, "cos_coef": 0.0, "start": start}
    r = _craft(opts, 1e-2, 3)
    got, before, m = _rows(r["out"]["params"]), _rows(r["updates"]["params"]), r["mal"]
    np.testing.assert_array_equal(got[~m], before[~m])
    want = before[m] if start == "normal" else np.zeros_like(before[m])
    np.testing.assert_allclose(got[m], want, atol=1e-6)
    assert np.abs(before[m]).max() > 1e-3  # the two starts are far apart


@pytest.mark.parametrize(
    ("opts", "name"),
    [
        ({"start": "theta"}, "start"),
        ({"variant": "dba"}, "variant"),
        ({"data": "everyone"}, "data"),
        ({"trigger_clamp_at": "never"}, "trigger_clamp_at"),
        ({"test_trigger": "best"}, "test_trigger"),
        ({"cos_term": "params"}, "cos_term"),
        ({"trigger_clamp": "dataset"}, "trigger_clamp"),
    ],
)
def test_options_are_checked(opts, name):
    cfg = override(get_preset("demo"), {"attack.name": "cerp", "attack.options": opts})
    with pytest.raises(ValueError, match=f"attack.options.{name}"):
        simulation.build(cfg, load_dataset("digits"))
