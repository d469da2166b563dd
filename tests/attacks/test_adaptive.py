"""The adaptive attack on MARS: the energy penalty lowers the backdoor energy MARS measures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax import simulation
from marsjax.attacks._adaptive import _code_spectral_sum
from marsjax.attacks.base import CraftContext
from marsjax.config import get_preset, override
from marsjax.data import load_dataset
from marsjax.defenses import energy

IDS = [0, 1, 10, 11, 12, 13, 14, 15, 16, 29]


@pytest.fixture(scope="module")
def setup():
    ds = load_dataset("digits")
    base = override(get_preset("demo"), {"attack.name": "adaptive"})
    sim = simulation.build(base, ds)
    g = sim.init_state().global_variables
    ids = jnp.array(IDS, jnp.int32)
    mal = ids < base.attack.num_attackers
    updates = jax.tree.map(lambda x: jnp.zeros((len(IDS),) + x.shape), g)
    ctx = CraftContext(g, jnp.int32(0), ids, mal, sim.data, sim.data.counts[ids])
    layout = energy.energy_layout(
        g, module_order=energy.module_call_order(sim.model, jnp.zeros((1, 8, 8, 1)))
    )

    def be_sum(variables):
        return float(sum(jnp.sum(b) for b in energy.backdoor_energy(variables, layout=layout)))

    def craft(**options):
        cfg = override(base, {"attack.options": {"poison_steps": 20, **options}})
        attack = simulation.build(cfg, ds).attack
        out, _ = jax.jit(attack.craft)(jax.random.key(0), updates, attack.init(g), ctx)
        return out

    return {"g": g, "craft": craft, "be_sum": be_sum, "mal": np.asarray(mal)}


def _model_of(setup, out, row=0):
    return jax.tree.map(lambda a, b: a + b[row], setup["g"], out)


def test_energy_penalty_lowers_backdoor_energy(setup):
    plain = setup["be_sum"](_model_of(setup, setup["craft"](lam=0.0)))
    out = setup["craft"](lam=0.5)
    adaptive = setup["be_sum"](_model_of(setup, out))
    assert adaptive < 0.5 * plain, (adaptive, plain)
    mal = setup["mal"]
    for leaf in jax.tree.leaves(out):
        x = np.asarray(leaf)
        assert np.all(x[~mal] == 0)  # benign rows untouched, no scaling of a shared model
        np.testing.assert_array_equal(x[0], x[1])
        assert np.all(np.isfinite(x))


def test_code_form_penalises_squared_layer_spectral_norms():
    params = {
        "conv": {"kernel": jnp.zeros((3, 3, 2, 4)).at[0, 0, 0, 0].set(2.0)},
        "fc": {"kernel": jnp.diag(jnp.array([3.0, 1.0])), "bias": jnp.ones(2)},
        "bn": {"scale": jnp.array([1.0, 2.0]), "bias": jnp.zeros(2)},
    }
    assert float(_code_spectral_sum(params)) == pytest.approx(4.0 + 9.0 + 5.0, rel=1e-5)
    g = jax.grad(_code_spectral_sum)(params)
    assert float(g["fc"]["kernel"][0, 0]) == pytest.approx(6.0, rel=1e-4)  # d(s^2) = 2 s u v^T
    assert float(jnp.abs(g["fc"]["bias"]).sum()) == 0.0  # biases are not "weight"s


def test_adaptive_rejects_bad_options():
    cfg = override(get_preset("demo"), {"attack.name": "adaptive", "attack.options": {"form": "x"}})
    with pytest.raises(ValueError, match="form"):
        simulation.build(cfg, load_dataset("digits"))
    cfg = override(cfg, {"attack.options": {"lam": -1.0}})
    with pytest.raises(ValueError, match="lam"):
        simulation.build(cfg, load_dataset("digits"))
