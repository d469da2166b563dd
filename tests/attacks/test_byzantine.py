"""Byzantine attacks (LFA, LIE, IPM, Min-Max, Min-Sum).

* the crafted rows against each paper's formula in numpy on hand-made updates: LIE's
  ``mean - z std`` with ``z = Φ^{-1}((n - s) / n)``, IPM's ``-ε mean``, Min-Max / Min-Sum's
  ``mean + γ p`` with ``γ`` the closed-form root of the paper's constraint (the halving search
  must land within its tolerance of it); benign rows untouched, attacker rows identical;
* LIE and IPM move the FedAvg aggregate against the benign mean (by ``-(f/n) z std``; IPM's
  inner product with the benign mean turns negative once ``ε > (n - f) / f``);
* LFA relabels as documented;
* in the compiled round (digits, MLP, 3 attackers of 10 per round, from a random start), every
  one of them lowers FedAvg's accuracy after two rounds below the no-attack run's with the same
  seed (same clients, same benign training).
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from marsjax import attacks, simulation
from marsjax.attacks import _byzantine
from marsjax.attacks.base import CraftContext
from marsjax.config import ConfigError, get_preset, override, validate
from marsjax.data import load_dataset

N, F = 10, 3
CTX = types.SimpleNamespace(num_classes=10, trigger=None)


def _updates(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.3, 1.0, size=(N, 4, 5)).astype(np.float32)
    b = rng.normal(-0.2, 0.5, size=(N, 7)).astype(np.float32)
    mal = np.zeros(N, bool)
    mal[[1, 4, 8]] = True
    return {"a": a, "b": b}, mal


def _flat(tree):
    return np.concatenate([np.asarray(tree[k]).reshape(N, -1) for k in ("a", "b")], axis=1)


def _craft(name, updates, mal, **options):
    attack = attacks.REGISTRY[name](CTX, **options)
    ctx = CraftContext(
        None, jnp.int32(0), jnp.arange(N, dtype=jnp.int32), jnp.asarray(mal), None, None
    )
    tree = jax.tree.map(jnp.asarray, updates)
    out, _ = jax.jit(lambda u: attack.craft(jax.random.key(0), u, attack.init(None), ctx))(tree)
    return _flat(jax.tree.map(np.asarray, out))


def _check_rows(out, x, mal, expected):
    np.testing.assert_array_equal(out[~mal], x[~mal])
    np.testing.assert_allclose(
        out[mal], np.broadcast_to(expected, (mal.sum(), x.shape[1])), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(("n", "f"), [(10, 3), (20, 4), (50, 12), (10, 0)])
def test_lie_z_is_the_papers_z_max(n, f):
    s = np.floor(n / 2 + 1) - f
    assert float(_byzantine.lie_z(n, f)) == pytest.approx(
        scipy.stats.norm.ppf((n - s) / n), rel=1e-5
    )


def test_lie_rows_and_the_aggregate_move_against_the_benign_mean():
    u, mal = _updates()
    x = _flat(u)
    mu, sd = x[~mal].mean(0), x[~mal].std(0)  # population std
    s = np.floor(N / 2 + 1) - F
    z = scipy.stats.norm.ppf((N - s) / N)
    out = _craft("lie", u, mal)
    _check_rows(out, x, mal, mu - z * sd)
    # FedAvg's aggregate moves by -(f/n) z std from the benign mean
    np.testing.assert_allclose(out.mean(0) - mu, -(F / N) * z * sd, rtol=1e-4, atol=1e-6)
    _check_rows(_craft("lie", u, mal, z=1.5), x, mal, mu - 1.5 * sd)


@pytest.mark.parametrize("eps", [0.5, 5.0])
def test_ipm_rows_and_the_aggregate_inner_product(eps):
    u, mal = _updates(1)
    x = _flat(u)
    mu = x[~mal].mean(0)
    out = _craft("ipm", u, mal, epsilon=eps)
    _check_rows(out, x, mal, -eps * mu)
    agg = out.mean(0)
    assert agg @ mu == pytest.approx(((N - F) - F * eps) / N * (mu @ mu), rel=1e-4)
    assert agg @ mu < mu @ mu
    assert (agg @ mu < 0) == (eps > (N - F) / F)


def _gamma_star(x, mal, p, objective):
    """The largest γ > 0 with the paper's constraint, in float64 closed form."""
    b = x[~mal].astype(np.float64)
    mu = b.mean(0)
    v = mu[None] - b  # m - u_i = v_i + γ p
    a_i, b_i, c = (v * v).sum(1), v @ p, p @ p
    pair = ((b[:, None] - b[None]) ** 2).sum(-1)
    if objective == "minmax":
        bound = pair.max()
        roots = (-b_i + np.sqrt(b_i**2 - c * (a_i - bound))) / c
        return roots.min()
    bound = pair.sum(1).max()
    k = len(b)
    aa, bb, cc = a_i.sum() - bound, b_i.sum(), k * c
    return (-bb + np.sqrt(bb**2 - cc * aa)) / cc


@pytest.mark.parametrize("objective", ["minmax", "minsum"])
@pytest.mark.parametrize("perturbation", ["unit_vec", "std", "sign"])
def test_min_max_min_sum_gamma_is_the_largest_feasible(objective, perturbation):
    u, mal = _updates(2)
    x = _flat(u)
    b = x[~mal].astype(np.float64)
    mu, sd = b.mean(0), b.std(0)
    p = {"unit_vec": -mu / np.linalg.norm(mu), "std": -sd, "sign": -np.sign(mu)}[perturbation]
    g = _gamma_star(x, mal, p, objective)
    assert 0 < g < 20  # inside the search's reach from gamma_init = 10
    out = _craft(objective, u, mal, perturbation=perturbation)
    got = out[mal][0]
    g_hat = float(np.dot(got - mu, p) / np.dot(p, p))
    assert g_hat == pytest.approx(g, rel=1e-3)
    assert g_hat <= g * (1 + 1e-5)  # never past the bound
    _check_rows(out, x, mal, mu + g_hat * p)


def test_lfa_relabels():
    x = jnp.zeros((4, 2, 2, 1), jnp.uint8)
    y = jnp.array([0, 3, 9, 5], jnp.int32)
    rev = attacks.REGISTRY["lfa"](CTX)
    shift = attacks.REGISTRY["lfa"](CTX, flip="shift")
    assert np.asarray(rev.poison(None, x, y, None)[1]).tolist() == [9, 6, 0, 4]
    assert np.asarray(shift.poison(None, x, y, None)[1]).tolist() == [1, 4, 0, 6]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("lfa", {"flip": "random"}),
        ("lie", {"z": -1.0}),
        ("ipm", {"epsilon": 0.0}),
        ("minmax", {"perturbation": "gauss"}),
        ("minsum", {"tau": 0.0}),
    ],
)
def test_bad_options_are_rejected_by_validate(name, options):
    cfg = override(get_preset("demo"), {"attack.name": name, "attack.options": options})
    with pytest.raises(ConfigError, match=name):
        validate(cfg)


# ------------------------------------------------------------------------------------------------
# In the compiled round


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _acc_after(digits, name, rounds=2):
    cfg = override(
        get_preset("demo"),
        {
            "model.name": "mlp",
            "attack.name": name,
            "attack.options": {},
            "attack.attackers_per_round": 3,
            "run.seed": 1,
        },
    )
    sim = simulation.build(cfg, digits)
    state = sim.init_state()
    for _ in range(rounds):
        state, m = sim.round_step(state, sim.data)
    assert sim.traces["round"] == 1
    assert int(m["num_attackers"]) == (0 if name == "none" else 3)
    assert int(m["num_dropped"]) == 0
    return sim.eval_state(state)["acc"]


@pytest.fixture(scope="module")
def clean_acc(digits):
    return _acc_after(digits, "none")


@pytest.mark.parametrize("name", ["lfa", "lie", "ipm", "minmax", "minsum"])
def test_byzantine_attacks_lower_fedavg_accuracy(digits, clean_acc, name):
    acc = _acc_after(digits, name)
    assert acc < clean_acc - 3.0, (name, acc, clean_acc)
