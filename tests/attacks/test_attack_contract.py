"""The contract between every registered attack and every registered defense (parametrized over
both registries, so attacks and defenses registered later are covered automatically).

On a tiny setting (digits, the small SimpleNet with BatchNorm, 8 clients, 4 per round with 2
attackers, one local step, attack training cut to two steps):

* **attack x defense, shared builds**: each attack's ``craft`` is compiled once (one trace, also
  for a second call with its new state) and run on the same stacked updates; the round's drop of
  non-finite rows is applied; each defense's ``apply`` is compiled once (one trace for all the
  attacks' inputs) and must return a finite aggregate, ``accepted`` in [0, 1] and scores of shape
  ``[N]``, and the new global model must be finite;
* **compiled rounds**: pairs run one whole compiled round each (``simulation.build`` +
  ``round_step`` from ``init_state()``: sampling, local training with ``poison``, ``craft``, the
  defense, the server update), with finite metrics and global model and one trace
  (``sim.traces["round"] == 1``).

The default suite runs a representative subset (about a minute of CPU): the shared-build check
for the attacks of issue 14 and ``none`` x every defense, and the compiled rounds of
Neurotoxin (the new attack with state) and the partial-layer attack under MARS (the Table 17
pair). Every new attack also runs in compiled rounds under FedAvg in its own test file, the
older attacks in ``test_attack_runs.py``, and every defense in a compiled round in
``tests/defenses/test_registry_contract.py``. ``MARSJAX_FULL_CONTRACT=1`` runs the whole
product: every registered attack in the shared-build check, and every attack x every defense in
its own compiled round (about 250 compilations: expect 30-60 min on 2 CPU cores).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax import attacks, defenses, simulation
from marsjax.attacks.base import CraftContext
from marsjax.config import get_preset, override
from marsjax.data import load_dataset
from marsjax.tree import row_is_finite, zero_rows

pytestmark = pytest.mark.slow

ATTACKS = sorted(attacks.REGISTRY)
DEFENSES = sorted(defenses.REGISTRY)

# Attack training cut to a couple of steps; 3DFed with the constants of the digits tests.
FAST_ATTACK = {
    "mra": {"poison_steps": 2},
    "adaptive": {"poison_steps": 2},
    "cerp": {"poison_steps": 2},
    "3dfed": {
        "poison_steps": 2,
        "ups_coef": 1e-3,
        "indicator_scale": 1e3,
        "indicator_threshold": 1e-3,
        "mask_steps": 2,
        "max_decoys": 1,
    },
    "partial": {"poison_steps": 2, "convs": 1},
    "dba": {"poison_steps": 2},
    "neurotoxin": {"poison_steps": 2},
    "a3fl": {"trigger_steps": 2, "adv_steps": 1, "adv_every": 1, "poison_steps": 2},
    "chameleon": {"poison_steps": 2},
}
FAST_ATTACK["dyn"] = {
    "threedfed_options": FAST_ATTACK["3dfed"],
    "cerp_options": FAST_ATTACK["cerp"],
    "mra_options": FAST_ATTACK["mra"],
}
# Defenses cut down as in tests/defenses/test_registry_contract.py.
FAST_DEFENSE = {
    "deepsight": {"num_samples": 100, "batch_size": 50},
    "indicator": {"epochs": 1, "num_ood": 64, "batch_size": 32},
    "fltrust": {"batch_size": 16, "local_epochs": 1},
    "rflbat": {"n_init": 3},
}

# The default suite's subset (the full product: MARSJAX_FULL_CONTRACT=1, see the docstring).
NEW_ATTACKS = (
    "partial",
    "dba",
    "neurotoxin",
    "lfa",
    "lie",
    "ipm",
    "minmax",
    "minsum",
    "dyn",
    "semantic",
    "a3fl",
    "chameleon",
)
DEFAULT_SHARED = ("none", *NEW_ATTACKS)
DEFAULT_ROUNDS = [("neurotoxin", "mars"), ("partial", "mars")]
FULL = os.environ.get("MARSJAX_FULL_CONTRACT", "") not in ("", "0")
SHARED = ATTACKS if FULL else sorted(DEFAULT_SHARED)
ROUNDS = [(a, d) for a in ATTACKS for d in DEFENSES] if FULL else DEFAULT_ROUNDS


def _config(attack: str, defense: str):
    cfg = get_preset("demo", defense=defense)
    return override(
        cfg,
        {
            "data.num_clients": 8,
            "run.clients_per_round": 4,
            "attack.num_attackers": 3,
            "attack.attackers_per_round": 2,
            "train.local_steps": 1,
            "attack.name": attack,
            "attack.options": FAST_ATTACK.get(attack, {}),
            "defense.options": FAST_DEFENSE.get(defense, {}),
            "run.seed": 0,
            "data.server_samples": 32,
        },
    )


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def round_inputs(digits):
    """Stacked updates of 4 clients (2 attackers) on a fresh global model, and the craft context."""
    sim = simulation.build(_config("none", "fedavg"), digits)
    g = sim.init_state().global_variables
    rng = np.random.default_rng(0)
    updates = jax.tree.map(lambda x: jnp.asarray(0.01 * rng.normal(size=(4, *x.shape)), x.dtype), g)
    ids = jnp.array([5, 0, 2, 7], jnp.int32)  # attackers are ids 0..2
    mal = ids < 3
    ctx = CraftContext(g, jnp.int32(0), ids, mal, sim.data, sim.data.counts[ids])
    return g, updates, ctx


@pytest.fixture(scope="module")
def crafted(digits, round_inputs):
    """attack name -> the uploads after its craft and the round's drop of non-finite rows."""
    g, updates, ctx = round_inputs
    out = {}
    for name in SHARED:
        sim = simulation.build(_config(name, "fedavg"), digits)
        attack = sim.attack
        traces = [0]

        def craft(key, u, s, c, attack=attack, traces=traces):
            traces[0] += 1
            return attack.craft(key, u, s, c)

        fn = jax.jit(craft)
        state = attack.init(g)
        u, new_state = fn(jax.random.key(1), updates, state, ctx)
        fn(jax.random.key(2), updates, new_state, ctx)  # a second round: same trace
        assert traces[0] == 1, name
        assert jax.tree.structure(new_state) == jax.tree.structure(state), name
        finite = row_is_finite(u)
        out[name] = (zero_rows(u, finite), finite.astype(jnp.float32))
    return out


@pytest.mark.parametrize("defense", DEFENSES)
def test_every_attack_through_every_defense(digits, round_inputs, crafted, defense):
    g, _, ctx = round_inputs
    sim = simulation.build(_config("none", defense), digits)
    d = sim.defense
    traces = [0]

    def apply(key, u, state, w):
        traces[0] += 1
        return d.apply(
            key, u, state, global_variables=g, client_weights=w, client_ids=ctx.client_ids
        )

    fn = jax.jit(apply)
    state = d.init(g)
    for name in SHARED:
        u, w = crafted[name]
        res, new_state = fn(jax.random.key(3), u, state, w)
        res = jax.tree.map(np.asarray, res)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(res.update)), (name, defense)
        assert res.accepted.shape == (4,) and res.scores.shape == (4,)
        assert np.all((res.accepted >= 0) & (res.accepted <= 1)), (name, defense)
        new_g = jax.tree.map(lambda a, b: np.asarray(a) + b, g, res.update)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(new_g)), (name, defense)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert traces[0] == 1, defense


@pytest.mark.parametrize(("attack", "defense"), ROUNDS, ids=[f"{a}-{d}" for a, d in ROUNDS])
def test_one_compiled_round(digits, attack, defense):
    sim = simulation.build(_config(attack, defense), digits)
    state = sim.init_state()
    state, m = sim.round_step(state, sim.data)
    assert sim.traces["round"] == 1
    m = jax.tree.map(np.asarray, m)
    assert int(m["num_attackers"]) == (0 if attack == "none" else 2)
    keys = ("fpr", "train_loss", "accepted") + (("tpr",) if attack != "none" else ())
    for k in keys:  # TPR is NaN by definition in a round without attackers
        assert np.all(np.isfinite(m[k])), (k, m[k])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.global_variables))
