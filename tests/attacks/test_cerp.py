"""CerP: trigger geometry, fine-tuning constraints, per-attacker poisoned updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax import simulation
from marsjax.attacks._cerp import cerp_pieces
from marsjax.attacks.base import CraftContext
from marsjax.config import get_preset, override
from marsjax.data import load_dataset

IDS = [0, 1, 3, 10, 11, 12, 13, 14, 15, 29]  # attackers 0, 1, 3


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


def _craft(opts, update_scale, seed):
    """One CerP ``craft`` on the demo federation (clients ``IDS``, random updates)."""
    ds = load_dataset("digits")
    cfg = override(get_preset("demo"), {"attack.name": "cerp", "attack.options": opts})
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
    out, state = jax.jit(sim.attack.craft)(jax.random.key(seed + 1), updates, state0, ctx)
    return {
        "sim": sim,
        "ds": ds,
        "updates": updates,
        "out": out,
        "state0": state0,
        "state": state,
        "mal": np.asarray(mal),
    }


@pytest.fixture(scope="module")
def setup():
    return _craft({"poison_steps": 6, "trigger_radius": 0.5}, 1e-3, 1)


def _rows(tree):
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], 1)


def test_cerp_rows(setup):
    r, before, mal = _rows(setup["out"]), _rows(setup["updates"]), setup["mal"]
    np.testing.assert_array_equal(r[~mal], before[~mal])
    assert np.all(np.isfinite(r))
    m = r[mal]
    # every attacker trained its own model: all different, all changed
    assert not np.allclose(m[0], m[1]) and not np.allclose(m[1], m[2])
    assert (np.abs(m - before[mal]).max(axis=1) > 1e-3).all()


def test_trigger_finetuned_within_radius_and_clamp(setup):
    t0, t = np.asarray(setup["state0"].trigger), np.asarray(setup["state"].trigger)
    full = cerp_pieces(setup["ds"].image_shape).any(0)
    full = np.broadcast_to(full, t.shape)
    assert int(setup["state"].attack_rounds) == 1
    assert np.linalg.norm(t - t0) <= 0.5 + 1e-4
    assert np.abs(t - t0).max() > 1e-4  # it moved
    assert t.min() >= -2.0 and t.max() <= 2.0
    np.testing.assert_array_equal(t[~full], t0[~full])


def test_test_trigger_stamps_the_whole_trigger(setup):
    sim, state = setup["sim"], setup["state"]
    x = jnp.asarray(setup["ds"].x_test[:4])
    stamped = sim.attack.trigger(x, state)
    full = cerp_pieces(setup["ds"].image_shape).any(0)
    ds = setup["ds"]
    norm = (np.asarray(stamped) / 255.0 - np.asarray(ds.mean)) / np.asarray(ds.std)
    t = np.asarray(state.trigger)
    np.testing.assert_allclose(
        norm[:, full[..., 0]],
        np.broadcast_to(t[full[..., 0]], norm[:, full[..., 0]].shape),
        atol=1e-4,
    )
    np.testing.assert_array_equal(
        np.asarray(stamped)[:, ~full[..., 0]], np.asarray(x)[:, ~full[..., 0]]
    )


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


def test_start_option_is_checked():
    cfg = override(
        get_preset("demo"), {"attack.name": "cerp", "attack.options": {"start": "theta"}}
    )
    with pytest.raises(ValueError, match="attack.options.start"):
        simulation.build(cfg, load_dataset("digits"))
