"""Hostile clients: every registered defense, inside the compiled round, against hostile uploads.

An attack registered for the test replaces the attackers' rows by a hostile update (NaN, +Inf,
1e30, -1e30, all zeros, or an exact copy of a benign client's update); which one is its state, set
in the round's start state. Each (defense, kind) pair gets its own round, started from the initial
state at round 0, followed by one clean round. Whatever the defense, the global model and the
server optimizer state stay finite. The round drops (``num_dropped``, ``accepted = 0``) every
non-finite upload and every finite one whose float32 squared norm overflows (1e30 entries): such a
row reaches the defense zeroed with weight 0, exactly like a NaN row, so a 1e30 round must end
bit for bit where the NaN round of the same start state ends (and so within the bound of a clean
round). Finite rows that do not overflow are never dropped, and no hostile kind stalls the
federation: the following clean round trains and is not reverted.

To compile the round once for all defenses (one compile per defense would cost minutes), a test
defense dispatches with ``lax.switch`` to every registered defense; which one runs is a selector
in its state, set in the round's start state. Each defense sees exactly what the round hands it.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax import attacks, defenses, simulation
from marsjax.attacks import Attack
from marsjax.config import get_preset, override
from marsjax.data import load_dataset

KINDS = ("nan", "inf", "big", "-big", "zeros", "duplicate")
DROPPED = ("nan", "inf", "big", "-big")  # the round drops these uploads
CLEAN = len(KINDS)  # the attack state of a clean round
BIG = 1e30
# A loose bound on how far one round moves any entry of the demo model: 4 benign clients, one
# local step each, move it by a few tenths at most (BatchNorm running statistics, the indicator's
# implant); a 1e30 upload that got in moves it by about 1e29.
MAX_MOVE = 10.0
_ATTACK = "_hostile_test"
_DEFENSE = "_hostile_all"
NAMES = tuple(sorted(n for n in defenses.REGISTRY if not n.startswith("_")))
# Lighter settings of the costliest defenses (fewer probe samples or server epochs; same logic),
# applied where the factory has that option.
LIGHT = {
    "deepsight": {"num_samples": 100, "batch_size": 50},
    "indicator": {"epochs": 1, "num_ood": 64, "batch_size": 32},
    "fltrust": {"batch_size": 16, "local_epochs": 1},
    "rflbat": {"n_init": 3},
}


def _light_options(name: str) -> dict:
    params = inspect.signature(defenses.REGISTRY[name]).parameters
    return {k: v for k, v in LIGHT.get(name, {}).items() if k in params}


def hostile(ctx: attacks.AttackContext) -> Attack:
    """Attackers upload the hostile update ``KINDS[state]`` (``state == CLEAN``: their own)."""

    def craft(key, updates, state, c: attacks.CraftContext):
        kind = state
        mal = c.is_malicious
        donor = jnp.argmax(~mal)  # the first benign row

        def rows(fill):
            def f(u):
                m = mal.reshape((-1,) + (1,) * (u.ndim - 1))
                return jnp.where(m, fill(u).astype(u.dtype), u)

            return lambda us: jax.tree.map(f, us)

        branches = [
            rows(lambda u: jnp.full_like(u, jnp.nan)),
            rows(lambda u: jnp.full_like(u, jnp.inf)),
            rows(lambda u: jnp.full_like(u, BIG)),
            rows(lambda u: jnp.full_like(u, -BIG)),
            rows(jnp.zeros_like),
            rows(lambda u: jnp.broadcast_to(u[donor], u.shape)),
            lambda us: us,  # CLEAN
        ]
        return jax.lax.switch(kind, branches, updates), state

    return Attack(
        init=lambda v: jnp.int32(CLEAN),
        poison=lambda key, x, y, state: (x, y),
        craft=craft,
        trigger=lambda x, state: x,
    )


def all_defenses(ctx: defenses.DefenseContext, errors: list | None = None) -> defenses.Defense:
    """Every registered defense behind one: ``state = (selector, state_0, state_1, ...)``.

    A defense that fails to build (default options, lightened by ``LIGHT``) is replaced by FedAvg
    and its error appended to ``errors`` (the test reports it).
    """
    built = []
    for name in NAMES:
        try:
            built.append(defenses.make(name, ctx, **_light_options(name)))
        except Exception as e:  # noqa: BLE001 (reported by the test)
            if errors is not None:
                errors.append(f"{name}: does not build: {e!r}")
            built.append(defenses.make("fedavg", ctx))

    def init(v):
        return (jnp.int32(0), *(d.init(v) for d in built))

    def apply(key, updates, state, **kwargs):
        selector, states = state[0], state[1:]

        def branch(i):
            def run(updates, states):
                result, new = built[i].apply(key, updates, states[i], **kwargs)
                out = list(states)
                out[i] = new
                return result, tuple(out)

            return run

        result, states = jax.lax.switch(
            selector, [branch(i) for i in range(len(built))], updates, states
        )
        return result, (selector, *states)

    return defenses.Defense(init, apply)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def _host(tree):
    return jax.tree.map(lambda x: np.array(x), tree)


def _max_move(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _identical(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_hostile_uploads_never_break_the_global_model(digits):
    cfg = override(
        get_preset("demo", defense=_DEFENSE),
        {
            "attack.name": _ATTACK,
            "attack.options": {},
            "attack.num_attackers": 6,
            "attack.attackers_per_round": 2,
            "run.clients_per_round": 6,
            "run.rounds": 2,
            "train.local_steps": 1,
            "data.server_samples": 32,
        },
    )
    errors = []
    attacks.REGISTRY[_ATTACK] = hostile
    defenses.REGISTRY[_DEFENSE] = lambda ctx: all_defenses(ctx, errors)
    try:
        sim = simulation.build(cfg, digits)
    finally:
        del attacks.REGISTRY[_ATTACK], defenses.REGISTRY[_DEFENSE]
    problems = list(errors)
    for k, name in enumerate(NAMES):
        after_nan = None  # (global variables, server optimizer state) after the NaN round
        for i, kind in enumerate(KINDS):
            state = sim.init_state()
            state = state._replace(
                attack_state=jnp.int32(i),
                defense_state=(jnp.int32(k), *state.defense_state[1:]),
            )
            start = _host(state.global_variables)
            state, m = sim.round_step(state, sim.data)
            mal = np.asarray(m["is_attacking"])
            accepted = np.asarray(m["accepted"])
            n_mal, dropped = int(mal.sum()), int(m["num_dropped"])
            assert n_mal == 2
            where = f"{name}, {kind} upload"
            if not (_finite(state.global_variables) and _finite(state.server_opt_state)):
                problems.append(f"{where}: the global model became non-finite")
            if not (np.all(np.isfinite(accepted)) and np.all((accepted >= 0) & (accepted <= 1))):
                problems.append(f"{where}: accepted weights {accepted} not finite in [0, 1]")
            if kind in DROPPED:
                if dropped != n_mal or np.any(accepted[mal] != 0):
                    problems.append(
                        f"{where}: num_dropped={dropped} (want {n_mal}), "
                        f"accepted[hostile]={accepted[mal]} (want 0)"
                    )
            elif dropped:
                problems.append(f"{where}: {dropped} finite rows dropped")
            if int(m["reverted"]):
                problems.append(f"{where}: the round was reverted (a hostile client stalls it)")
            moved = _max_move(state.global_variables, start)
            if not moved <= MAX_MOVE:
                problems.append(f"{where}: the model moved by {moved:.3g} (bound {MAX_MOVE})")
                continue  # a ruined (finite) model cannot train cleanly in the next round
            result = _host((state.global_variables, state.server_opt_state))
            if kind == "nan":
                after_nan = result
            elif kind in DROPPED and not _identical(result, after_nan):
                problems.append(f"{where}: the round does not end where the NaN round ends")
            # the next, clean round trains normally from what the hostile round left
            state = state._replace(attack_state=jnp.int32(CLEAN))
            state, m = sim.round_step(state, sim.data)
            if not _finite(state.global_variables):
                problems.append(f"{where}: the next clean round made the model non-finite")
            if int(m["num_dropped"]) or int(m["reverted"]):
                problems.append(
                    f"{where}: the next clean round dropped {int(m['num_dropped'])} rows, "
                    f"reverted={int(m['reverted'])} (state poisoned)"
                )
    assert sim.traces["round"] == 1  # one compiled round for every defense and kind
    assert not problems, "\n".join(problems)
