"""Model replacement and the helpers it shares with CerP, 3DFed and the adaptive attack."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax import simulation
from marsjax.attacks import _mra
from marsjax.attacks.base import CraftContext
from marsjax.client import ClientData
from marsjax.config import get_preset, override
from marsjax.data import load_dataset

IDS = [0, 1, 10, 11, 12, 13, 14, 15, 16, 29]


def test_attacker_ranks():
    r = _mra.attacker_ranks(jnp.array([5, 0, 3, 9]), jnp.array([True, False, True, True]))
    assert np.asarray(r).tolist() == [1, -1, 0, 2]


def test_attacker_data_first_and_pooled():
    data = ClientData(
        x=jnp.zeros((10, 2, 2, 1), jnp.uint8),
        y=jnp.zeros((10,), jnp.int32),
        indices=jnp.array([[0, 1, 2, 0], [3, 4, 0, 0], [5, 6, 7, 8]], jnp.int32),
        counts=jnp.array([3, 2, 4], jnp.int32),
    )
    ids = jnp.array([2, 0, 1], jnp.int32)
    mal = jnp.array([True, False, True])
    c = CraftContext(None, jnp.int32(0), ids, mal, data, data.counts[ids])
    idx, count, ref = _mra.attacker_data(c, "first")
    assert int(ref) == 2 and int(count) == 2 and np.asarray(idx)[:2].tolist() == [3, 4]
    idx, count, ref = _mra.attacker_data(c, "pooled")
    assert int(count) == 6 and int(ref) == 2
    assert np.asarray(idx)[:6].tolist() == [5, 6, 7, 8, 3, 4]
    with pytest.raises(ValueError, match="data"):
        _mra.attacker_data(c, "all")


def test_params_norm_gradient_is_finite_at_zero():
    tree = {"params": {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}}
    g = jax.grad(lambda t: _mra.params_norm(t))(tree)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(g))
    assert float(_mra.params_norm({"params": {"a": jnp.array([3.0, 4.0])}})) == pytest.approx(5.0)


@pytest.fixture(scope="module")
def setup():
    ds = load_dataset("digits")
    base = override(get_preset("demo"), {"attack.name": "mra"})
    sim = simulation.build(base, ds)
    g = sim.init_state().global_variables
    ids = jnp.array(IDS, jnp.int32)
    mal = ids < base.attack.num_attackers
    updates = jax.tree.map(
        lambda x: 1e-3 * jax.random.normal(jax.random.key(1), (len(IDS),) + x.shape), g
    )
    ctx = CraftContext(g, jnp.int32(0), ids, mal, sim.data, sim.data.counts[ids])

    cache = {}

    def craft(**options):
        key = repr(sorted(options.items()))
        if key not in cache:
            cfg = override(base, {"attack.options": {"poison_steps": 8, **options}})
            attack = simulation.build(cfg, ds).attack
            cache[key] = jax.jit(attack.craft)(jax.random.key(2), updates, attack.init(g), ctx)
        return cache[key]

    return {"craft": craft, "updates": updates, "mal": np.asarray(mal)}


def _rows(tree):
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(tree)], 1)


def test_mra_rows_identical_scaled_and_benign_untouched(setup):
    out5, _ = setup["craft"](scale=5.0, lr=0.2)
    out1, _ = setup["craft"](scale=1.0, lr=0.2)
    r5, r1, before = _rows(out5), _rows(out1), _rows(setup["updates"])
    mal = setup["mal"]
    np.testing.assert_array_equal(r5[~mal], before[~mal])
    assert np.all(np.isfinite(r5))
    np.testing.assert_array_equal(r5[0], r5[1])  # every attacker uploads the same update
    np.testing.assert_allclose(r5[mal], 5.0 * r1[mal], rtol=1e-5, atol=1e-7)
    assert np.abs(r1[0]).max() > 1e-3


def test_mra_own_uploads_distinct_per_attacker_and_scaled(setup):
    own5, _ = setup["craft"](scale=5.0, lr=0.2, uploads="own")
    own1, _ = setup["craft"](scale=1.0, lr=0.2, uploads="own")
    shared, _ = setup["craft"](scale=5.0, lr=0.2)
    r5, r1, before, rs = _rows(own5), _rows(own1), _rows(setup["updates"]), _rows(shared)
    mal = setup["mal"]
    assert mal.sum() >= 2
    np.testing.assert_array_equal(r5[~mal], before[~mal])
    np.testing.assert_allclose(r5[mal], 5.0 * r1[mal], rtol=1e-5, atol=1e-7)
    att = r5[mal]
    for i in range(len(att)):  # every attacker row is its own model: no two rows coincide
        assert np.abs(att[i]).max() > 5e-3
        for j in range(i):
            assert np.abs(att[i] - att[j]).max() > 1e-4
    assert np.abs(att[0] - rs[mal][0]).max() > 1e-4  # not the shared model


def test_blind_loss_distance_term_constrains_the_update(setup):
    constrained, _ = setup["craft"](scale=1.0, lr=0.2)  # default weights (0.3, 0.3, 0.4)
    free, _ = setup["craft"](scale=1.0, loss_weights=(0.3, 0.3, 0.0), lr=0.2)
    mal = setup["mal"]
    n_c = np.linalg.norm(_rows(constrained["params"])[mal][0])
    n_f = np.linalg.norm(_rows(free["params"])[mal][0])
    assert n_c < n_f


@pytest.mark.parametrize(
    "options, match",
    [
        ({"scale": 0.0}, "scale"),
        ({"lr": -1.0}, "lr"),
        ({"poison_epochs": 0}, "poison_epochs"),
        ({"data": "everyone"}, "data"),
        ({"uploads": "each"}, "uploads"),
    ],
)
def test_mra_rejects_bad_options(options, match):
    cfg = override(get_preset("demo"), {"attack.name": "mra", "attack.options": options})
    with pytest.raises(ValueError, match=match):
        simulation.build(cfg, load_dataset("digits"))
