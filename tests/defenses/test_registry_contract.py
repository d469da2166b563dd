"""The contract every registered defense keeps (parametrized over ``defenses.REGISTRY``, so
defenses registered later are covered automatically):

* ``apply`` runs under ``jax.jit``; ``accepted``/``scores`` are float32 ``[N]``; the update has the
  global variables' tree, shapes and dtypes; the state keeps its structure round to round;
* all-benign input gives approximately the FedAvg aggregate;
* permuting the clients permutes ``accepted`` and leaves the aggregate unchanged;
* hostile uploads (NaN / Inf rows as the round delivers them, raw 1e30 rows, all-zero rows, exact
  copies) never make the update or the global model non-finite, and dropped rows get
  ``accepted = 0``; through ``simulation`` with an attack that uploads NaN and 1e30 too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax import attacks, defenses, simulation
from marsjax.client import make_normalize
from marsjax.config import TrainConfig, get_preset, override
from marsjax.data import load_dataset
from marsjax.models import build_model

N = 10
NAMES = sorted(defenses.REGISTRY)

# Smaller settings so that every defense compiles and runs in seconds on a CPU.
FAST_OPTIONS = {
    "deepsight": {"num_samples": 100, "batch_size": 50},
    "indicator": {"epochs": 1, "num_ood": 64, "batch_size": 32},
    "fltrust": {"batch_size": 16, "local_epochs": 1},
    "rflbat": {"n_init": 3},
}

# Defenses whose aggregate is not a (sub)average of the uploads by design.
NOT_AN_AVERAGE = {
    "fedclp": "CLP prunes outlier channels of every local model before averaging",
    "indicator": "the returned update also plants the indicator task in the global model",
    "fltrust": "updates are rescaled to the norm of the server's own update",
}

# The baselines of this package also reject raw non-finite rows given a positive weight
# (the round never sends those; the interface only requires weight-0 rows to be ignored).
SELF_SANITIZING = [n for n in NAMES if n not in ("fedavg", "mars", "mars_star")]


@pytest.fixture(scope="module")
def setup():
    ds = load_dataset("digits")
    model = build_model("simplenet", ds.num_classes, width="small", batch_norm=True)
    norm = make_normalize(ds.mean, ds.std)
    ctx = defenses.DefenseContext(
        model=model,
        num_clients=N,
        clients_per_round=N,
        attackers_per_round=2,
        num_classes=ds.num_classes,
        image_shape=ds.image_shape,
        normalize=norm,
        server_rule="mean",
        server_lr=1.0,
        eta=0.8,
        train=TrainConfig(),
        server_data=(ds.x_train[:32], ds.y_train[:32]),
    )
    g = model.init(jax.random.key(0), jnp.zeros((1, *ds.image_shape), jnp.float32))
    rng = np.random.default_rng(0)

    def stacked(base, noise):
        return jax.tree.map(
            lambda b: jnp.asarray(b[None] + noise * rng.normal(size=(N, *b.shape)), jnp.float32),
            base,
        )

    base = jax.tree.map(lambda a: 0.02 * rng.normal(size=a.shape), g)
    benign = stacked(base, 0.002)
    hostile_base = jax.tree.map(lambda a: -0.2 * rng.normal(size=a.shape), g)
    outliers = jax.tree.map(
        lambda b, h: b.at[N - 2 :].set(
            jnp.asarray(h[None] + 0.001 * rng.normal(size=(2, *h.shape)), jnp.float32)
        ),
        benign,
        hostile_base,
    )
    return {"ctx": ctx, "g": g, "benign": benign, "outliers": outliers, "ds": ds}


_BUILT = {}


def _defense(name, setup):
    if name not in _BUILT:
        d = defenses.make(name, setup["ctx"], **FAST_OPTIONS.get(name, {}))
        _BUILT[name] = (d, jax.jit(d.apply))
    return _BUILT[name]


def _apply(name, setup, updates, weights=None, key=0):
    d, fn = _defense(name, setup)
    g = setup["g"]
    state = d.init(g)
    w = jnp.ones(N) if weights is None else jnp.asarray(weights, jnp.float32)
    res, new_state = fn(
        jax.random.key(key),
        updates,
        state,
        global_variables=g,
        client_weights=w,
        client_ids=jnp.arange(N, dtype=jnp.int32),
    )
    return res, state, new_state


def _params_vector(tree):
    return np.concatenate(
        [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree["params"])]
    )


def _all_finite(tree):
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


def check_jit_shapes_dtypes_and_state(name, setup):
    res, state, new_state = _apply(name, setup, setup["benign"])
    g = setup["g"]
    assert jax.tree.structure(res.update) == jax.tree.structure(g)
    for u, v in zip(jax.tree.leaves(res.update), jax.tree.leaves(g)):
        assert u.shape == v.shape and u.dtype == v.dtype
    for arr in (res.accepted, res.scores):
        assert arr.shape == (N,) and arr.dtype == jnp.float32
        assert np.isfinite(np.asarray(arr)).all()
    acc = np.asarray(res.accepted)
    assert np.all((acc >= 0) & (acc <= 1))
    assert _all_finite(res.update)
    # the state keeps its structure, shapes and dtypes (a scan over rounds needs that)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
        assert jnp.shape(a) == jnp.shape(b) and jnp.result_type(a) == jnp.result_type(b)


def check_all_benign_is_close_to_fedavg(name, setup):
    res, _, _ = _apply(name, setup, setup["benign"])
    mean = jax.tree.map(lambda u: jnp.mean(u, 0), setup["benign"])
    got, ref = _params_vector(res.update), _params_vector(mean)
    assert np.linalg.norm(got - ref) <= 0.25 * np.linalg.norm(ref)
    assert np.asarray(res.accepted).sum() >= 1


def check_permuting_clients_permutes_accepted(name, setup):
    perm = np.array([3, 9, 0, 5, 1, 8, 2, 7, 4, 6])
    ups = setup["outliers"]
    res, _, _ = _apply(name, setup, ups)
    res_p, _, _ = _apply(name, setup, jax.tree.map(lambda u: u[perm], ups))
    np.testing.assert_allclose(
        np.asarray(res_p.accepted), np.asarray(res.accepted)[perm], atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(res_p.scores), np.asarray(res.scores)[perm], rtol=1e-3, atol=1e-5
    )
    np.testing.assert_allclose(
        _params_vector(res_p.update), _params_vector(res.update), rtol=1e-3, atol=1e-5
    )


def _hostile(setup, raw_nonfinite: bool):
    """Rows 0: NaN entry, 1: +Inf entry, 2: all 1e30, 3: all zeros, 4: exact copy of row 5."""
    ups = setup["outliers"]

    def f(u):
        u = np.array(u)
        u[0].flat[0] = np.nan
        u[1].flat[-1] = np.inf
        u[2] = 1e30
        u[3] = 0.0
        u[4] = u[5]
        return jnp.asarray(u)

    ups = jax.tree.map(f, ups)
    w = np.ones(N, np.float32)
    if not raw_nonfinite:  # what the round delivers: non-finite rows zeroed, weight 0
        for i in (0, 1):
            ups = jax.tree.map(lambda u, i=i: u.at[i].set(0.0), ups)
        w[[0, 1]] = 0.0
    return ups, w


def check_hostile_uploads_keep_the_model_finite(name, setup, raw_nonfinite):
    ups, w = _hostile(setup, raw_nonfinite)
    res, _, _ = _apply(name, setup, ups, w)
    assert _all_finite(res.update)
    acc, sc = np.asarray(res.accepted), np.asarray(res.scores)
    assert np.isfinite(acc).all() and np.isfinite(sc).all()
    assert acc[0] == 0 and acc[1] == 0
    new_global = jax.tree.map(lambda g, u: g + u, setup["g"], res.update)
    assert _all_finite(new_global)


@pytest.mark.parametrize("name", NAMES)
def test_defense_contract(name, setup):
    """All checks of one defense in one test, so that it compiles once per test process."""
    check_jit_shapes_dtypes_and_state(name, setup)
    if name not in NOT_AN_AVERAGE:
        check_all_benign_is_close_to_fedavg(name, setup)
    check_permuting_clients_permutes_accepted(name, setup)
    check_hostile_uploads_keep_the_model_finite(name, setup, raw_nonfinite=False)
    if name in SELF_SANITIZING:
        check_hostile_uploads_keep_the_model_finite(name, setup, raw_nonfinite=True)


# ------------------------------------------------------------------------------------------------
# Through the compiled round, with an attack that uploads NaN and 1e30


def _hostile_attack(ctx: attacks.AttackContext) -> attacks.Attack:
    def craft(key, updates, state, c):
        rank = jnp.cumsum(c.is_malicious) * c.is_malicious  # 1 for the first attacker, 2, ...

        def f(u):
            r = rank.reshape((-1,) + (1,) * (u.ndim - 1))
            u = jnp.where(r == 1, jnp.nan, u)
            return jnp.where(r == 2, jnp.asarray(1e30, u.dtype), u)

        return jax.tree.map(f, updates), state

    return attacks.Attack(
        init=lambda v: attacks.EmptyState(),
        poison=lambda key, x, y, s: (x, y),
        craft=craft,
        trigger=lambda x, s: x,
    )


def test_round_with_nan_and_huge_uploads_stays_finite(setup, monkeypatch):
    name = "multikrum"
    monkeypatch.setitem(attacks.REGISTRY, "hostile_test", _hostile_attack)
    cfg = override(
        get_preset("demo", defense=name),
        {"attack.name": "hostile_test", "attack.options": {}, "run.rounds": 2},
    )
    sim = simulation.build(cfg, setup["ds"])
    state = sim.init_state()
    for _ in range(2):
        state, m = sim.round_step(state, sim.data)
        # the NaN upload and the 1e30 one (its squared norm overflows float32) are both dropped
        # before the defense sees them
        assert int(m["num_dropped"]) == 2
        assert _all_finite(state.global_variables)
        mal = np.asarray(m["is_attacking"])
        assert np.all(np.asarray(m["accepted"])[mal] == 0) and int(m["reverted"]) == 0
