"""Dyn-Attack (MARS paper, Table 13).

* the pick is drawn per attacker and per round: over 400 rounds of 8 attackers every attacker
  takes every candidate, most rounds mix candidates, the frequencies follow ``probs``, benign
  rows get -1, and the same key gives the same picks;
* in one craft, every attacker's row equals the row that its picked attack alone writes (same
  key, ``is_malicious`` restricted to the attackers that picked it), "none" rows and benign rows
  are the honest updates;
* bad options are refused (through the config check);
* under FedAvg the ASR rises far above the clean model's within six rounds (digits, two
  attackers per round, each picking at random), and the picks recorded in the state change from
  round to round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_backdoor_attacks import digits, pretrained  # noqa: F401 (fixtures)

from marsjax import simulation
from marsjax.attacks import _dyn
from marsjax.attacks.base import CraftContext
from marsjax.config import ConfigError, get_preset, override, validate

FAST_3DFED = {
    "ups_coef": 1e-3,
    "indicator_scale": 1e3,
    "indicator_threshold": 1e-3,
    "mask_steps": 2,
}


def _options(steps: dict) -> dict:
    return {
        "threedfed_options": {**FAST_3DFED, **steps},
        "cerp_options": dict(steps),
        "mra_options": dict(steps),
    }


def _build(digits, name, options):  # noqa: F811
    cfg = override(
        get_preset("demo"), {"attack.name": name, "attack.options": options, "run.seed": 1}
    )
    return simulation.build(cfg, digits)


def test_dyn_picks_per_attacker_and_per_round():
    ids = jnp.arange(8, dtype=jnp.int32)
    mal = jnp.ones((8,), bool)
    probs = (0.25, 0.25, 0.25, 0.25)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(0), r))(jnp.arange(400))
    picks = np.asarray(jax.vmap(lambda k: _dyn.dyn_choices(k, ids, mal, probs))(keys))
    assert picks.shape == (400, 8) and picks.min() == 0 and picks.max() == 3
    for col in picks.T:  # every attacker takes every candidate over the rounds
        assert set(col.tolist()) == {0, 1, 2, 3}
    mixed = np.mean([len(set(row.tolist())) > 1 for row in picks])
    assert mixed > 0.95  # attackers of one round pick independently
    freq = np.bincount(picks.ravel(), minlength=4) / picks.size
    np.testing.assert_allclose(freq, 0.25, atol=0.04)
    same = _dyn.dyn_choices(keys[3], ids, mal, probs)
    np.testing.assert_array_equal(np.asarray(same), picks[3])
    half = _dyn.dyn_choices(keys[3], ids, ids % 2 == 0, probs)
    np.testing.assert_array_equal(np.asarray(half)[1::2], -1)
    np.testing.assert_array_equal(np.asarray(half)[::2], picks[3][::2])
    skew = jax.vmap(lambda k: _dyn.dyn_choices(k, ids, mal, (0.7, 0.1, 0.1, 0.1)))(keys)
    assert abs(np.mean(np.asarray(skew) == 0) - 0.7) < 0.04


def test_dyn_rejects_bad_options():
    base = get_preset("demo")
    for bad in (
        {"choices": ("mra", "badnets")},
        {"probs": (0.5, 0.5)},
        {"probs": (0.5, 0.5, 0.5, -0.5)},
        {"mra_options": {"scael": 5}},
        {"test_trigger": "cerp", "choices": ("mra", "none")},
    ):
        with pytest.raises(ConfigError):
            validate(override(base, {"attack.name": "dyn", "attack.options": bad}))


@pytest.mark.slow
def test_dyn_rows_equal_the_picked_attack_alone(digits, pretrained):  # noqa: F811
    opts = _options({"poison_steps": 3})
    sim = _build(digits, "dyn", opts)
    g = jax.tree.map(jnp.asarray, pretrained[0])
    ids = jnp.array([0, 7, 1, 2, 20, 3, 4, 23, 5, 25], jnp.int32)
    mal = ids < 6  # 6 attackers
    # A round key whose picks use every candidate.
    for seed in range(100):
        key = jax.random.key(seed)
        k_choice, _ = jax.random.split(key)
        pick = np.asarray(_dyn.dyn_choices(k_choice, ids, mal, (0.25,) * 4))
        if set(pick[np.asarray(mal)].tolist()) == {0, 1, 2, 3}:
            break
    else:
        pytest.fail("no key picks every candidate")
    updates = jax.tree.map(
        lambda x: 1e-3 * jax.random.normal(jax.random.key(1), (10,) + x.shape), g
    )
    ctx = CraftContext(g, jnp.int32(0), ids, mal, sim.data, sim.data.counts[ids])
    out, state = jax.jit(sim.attack.craft)(key, updates, sim.attack.init(g), ctx)
    np.testing.assert_array_equal(np.asarray(state.last_choice), pick)
    out = jax.tree.map(np.asarray, out)
    honest = (pick == -1) | (pick == 3)
    for u, o in zip(jax.tree.leaves(updates), jax.tree.leaves(out)):
        np.testing.assert_array_equal(o[honest], np.asarray(u)[honest])
    sub_opts = {"3dfed": opts["threedfed_options"], "cerp": {"poison_steps": 3}}
    sub_opts["mra"] = {"poison_steps": 3}
    for j, name in enumerate(("3dfed", "cerp", "mra")):
        alone = _build(digits, name, sub_opts[name]).attack
        rows = pick == j
        ref, _ = jax.jit(alone.craft)(
            _dyn.dyn_craft_key(key, name),
            updates,
            alone.init(g),
            ctx._replace(is_malicious=jnp.asarray(rows)),
        )
        for r, o in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
            np.testing.assert_allclose(o[rows], np.asarray(r)[rows], rtol=1e-5, atol=1e-6)
        moved = max(
            np.abs(o[rows] - np.asarray(u)[rows]).max()
            for u, o in zip(jax.tree.leaves(updates), jax.tree.leaves(out))
        )
        assert moved > 1e-3, name  # the attack did rewrite its rows


@pytest.mark.slow
def test_dyn_raises_fedavg_asr(digits, pretrained):  # noqa: F811
    sim = _build(digits, "dyn", _options({"poison_epochs": 3}))
    g0, clean_asr = pretrained
    state = sim.init_state()._replace(global_variables=jax.tree.map(jnp.array, g0))
    picks = []
    for _ in range(6):
        state, m = sim.round_step(state, sim.data)
        assert int(m["num_attackers"]) == 2 and int(m["num_dropped"]) == 0
        mal = np.asarray(m["is_attacking"])
        picks.append(np.asarray(state.attack_state.last_choice)[mal].tolist())
    assert sim.traces["round"] == 1
    assert len({tuple(p) for p in picks}) > 1, picks
    ev = sim.eval_state(state)
    assert ev["acc"] > 80.0
    assert ev["asr"] > max(50.0, clean_asr + 30.0), (ev, clean_asr, picks)
