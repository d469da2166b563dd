"""A3FL (Zhang et al., NeurIPS 2023; MARS paper Table 14).

* the trigger is a patch (the pattern's bounding box): optimisation moves pixels inside it only,
  keeps them in [0, 255], and halves the global model's loss towards the target on triggered
  images it did not see (the objective itself rises each time the adversarial model is rebuilt
  against the current trigger, by design);
* the adversarial model unlearns the trigger: on triggered images with their true labels its
  loss is below the global model's;
* under FedAvg the ASR rises far above the clean model's within four rounds (digits, 2 attackers
  of 10 per round, a short trigger optimisation), above the clean model's with the pattern and
  with the optimised trigger, with one trace of the round and the trigger carried in the state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_backdoor_attacks import digits, pretrained  # noqa: F401 (fixtures)

from marsjax import simulation
from marsjax.attacks import _a3fl
from marsjax.client import cross_entropy_loss, make_normalize
from marsjax.config import get_preset, override
from marsjax.data.triggers import pattern_trigger

OPTIONS = {"trigger_steps": 20, "adv_steps": 2, "adv_every": 5, "poison_epochs": 3}


def _sim(digits, **options):  # noqa: F811
    cfg = override(
        get_preset("demo"),
        {"attack.name": "a3fl", "attack.options": {**OPTIONS, **options}, "run.seed": 1},
    )
    return simulation.build(cfg, digits)


def test_trigger_optimisation_stays_in_the_patch_and_lowers_the_objective(digits, pretrained):  # noqa: F811
    sim = _sim(digits)
    g = jax.tree.map(jnp.asarray, pretrained[0])
    trig = pattern_trigger(digits.image_shape)
    mask = _a3fl.patch_mask(trig.mask)
    assert mask.sum() == 15 and np.all(mask[trig.mask])  # the 5x3 box around the pattern
    norm = make_normalize(digits.mean, digits.std)
    rng = np.random.default_rng(0)
    pos = rng.integers(0, len(digits.y_train), size=(60, 16))
    xs, ys = jnp.asarray(digits.x_train[pos]), jnp.asarray(digits.y_train[pos])
    t0 = jnp.asarray(np.broadcast_to(trig.value, digits.image_shape).astype(np.float32))
    t, losses = jax.jit(
        lambda t0: _a3fl.optimise_trigger(
            sim.model,
            norm,
            g,
            t0,
            jnp.asarray(mask),
            xs,
            ys,
            8,
            trigger_lr=0.02,
            adv_steps=2,
            adv_every=5,
            adv_lambda=1.0,
            lr=0.01,
        )
    )(t0)
    t, losses = np.asarray(t), np.asarray(losses)
    assert np.all(t[~mask[..., 0]] == np.asarray(t0)[~mask[..., 0]])
    assert t.min() >= 0 and t.max() <= 255 and np.abs(t - np.asarray(t0)).max() > 0
    assert losses.shape == (60,) and np.all(np.isfinite(losses))

    adv = _a3fl.adversarial_model(
        sim.model, norm, g, jnp.asarray(t), jnp.asarray(mask), xs[:5], ys[:5], 0.01
    )
    x, y = xs[5:].reshape(-1, *xs.shape[2:]), ys[5:].reshape(-1)
    xt = jnp.where(jnp.asarray(mask), jnp.asarray(t), x.astype(jnp.float32))

    def loss(params):
        v = {**g, "params": params}
        return float(cross_entropy_loss(sim.model.apply(v, norm(xt), train=False), y))

    assert loss(adv) < loss(g["params"])

    def target_loss(trigger):  # the global model's term, on batches the optimisation did not use
        xt = jnp.where(jnp.asarray(mask), trigger, x.astype(jnp.float32))
        logits = sim.model.apply(g, norm(xt), train=False)
        return float(cross_entropy_loss(logits, jnp.full(y.shape, 8, jnp.int32)))

    assert target_loss(jnp.asarray(t)) < 0.5 * target_loss(t0)


@pytest.mark.slow
def test_a3fl_raises_fedavg_asr(digits, pretrained):  # noqa: F811
    sim = _sim(digits)
    g0, clean_asr = pretrained
    state = sim.init_state()._replace(global_variables=jax.tree.map(jnp.array, g0))
    t_init = np.asarray(state.attack_state.trigger)
    for _ in range(4):
        state, m = sim.round_step(state, sim.data)
        assert int(m["num_attackers"]) == 2 and int(m["num_dropped"]) == 0
    assert sim.traces["round"] == 1
    assert int(state.attack_state.attack_rounds) == 4
    assert np.abs(np.asarray(state.attack_state.trigger) - t_init).max() > 0
    ev = sim.eval_state(state)
    # The clean model's ASR with the optimised trigger (an adversarial patch alone may fool it).
    clean_opt = float(
        sim.evaluate(jax.tree.map(jnp.asarray, g0), state.attack_state, sim.x_test, sim.y_test)[
            "asr"
        ]
    )
    assert ev["acc"] > 80.0
    assert ev["asr"] > max(50.0, clean_asr + 30.0, clean_opt + 30.0), (ev, clean_asr, clean_opt)
