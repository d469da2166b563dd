"""Chameleon (Dai & Li, ICML 2023; MARS paper Table 15).

* the supervised contrastive loss equals a loop-by-loop numpy reference, with obstructive peers
  weighted in the denominators;
* the crafted model moves the triggered images' representations (the last dense layer's input)
  towards the target class and away from their own class, compared with the global model, and
  the upload is one shared model in every attacker's row (benign rows untouched);
* under FedAvg the ASR rises far above the clean model's within four rounds (digits, 2 attackers
  of 10 per round).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_backdoor_attacks import _craft_rows, digits, pretrained  # noqa: F401 (fixtures)

from marsjax import simulation
from marsjax.attacks import _chameleon
from marsjax.client import make_normalize
from marsjax.config import get_preset, override
from marsjax.data.triggers import apply_trigger, pattern_trigger

OPTIONS = {"contrastive_epochs": 3, "head_epochs": 2}


def _sim(digits, **options):  # noqa: F811
    cfg = override(
        get_preset("demo"),
        {"attack.name": "chameleon", "attack.options": {**OPTIONS, **options}, "run.seed": 1},
    )
    return simulation.build(cfg, digits)


def _supcon_reference(z, labels, tau, obstructive, weight):
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z)
    total, anchors = 0.0, 0
    for i in range(n):
        den = sum(
            (weight if obstructive[i, j] else 1.0) * np.exp(z[i] @ z[j] / tau)
            for j in range(n)
            if j != i
        )
        pos = [j for j in range(n) if j != i and labels[j] == labels[i]]
        if not pos:
            continue
        total += -np.mean([z[i] @ z[p] / tau - np.log(den) for p in pos])
        anchors += 1
    return total / anchors


def test_supcon_loss_matches_reference():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(9, 5)).astype(np.float32)
    labels = np.array([0, 1, 0, 2, 1, 0, 3, 2, 1])  # class 3 has no positive
    obstructive = rng.random((9, 9)) < 0.3
    for weight in (1.0, 2.5):
        got = _chameleon.supcon_loss(
            jnp.asarray(z), jnp.asarray(labels), 0.5, jnp.asarray(obstructive), weight
        )
        ref = _supcon_reference(z.astype(np.float64), labels, 0.5, obstructive, weight)
        np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def _features(model, variables, x):
    _, inter = model.apply(variables, x, train=False, capture_intermediates=True)
    return np.maximum(np.asarray(inter["intermediates"]["fc1"]["__call__"][0]), 0.0)


def _cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    return a @ (b / np.linalg.norm(b))


@pytest.mark.slow
def test_chameleon_pulls_triggered_features_to_the_target(digits, pretrained):  # noqa: F811
    sim = _sim(digits)
    g = jax.tree.map(jnp.asarray, pretrained[0])
    updates, out, mal = _craft_rows(sim, g)
    for u, o in zip(jax.tree.leaves(updates), jax.tree.leaves(out)):
        np.testing.assert_array_equal(o[~mal], u[~mal])
        np.testing.assert_array_equal(o[mal][0], o[mal][1])
    row = int(np.flatnonzero(mal)[0])
    crafted = jax.tree.map(lambda a, o: a + o[row], g, out)
    norm = make_normalize(digits.mean, digits.std)
    trig = pattern_trigger(digits.image_shape)
    src = digits.x_test[digits.y_test == 3][:60]
    tgt = digits.x_test[digits.y_test == 8][:60]
    stamped = norm(apply_trigger(jnp.asarray(src), trig))
    gaps = {}
    for name, v in (("global", g), ("crafted", crafted)):
        f_bd = _features(sim.model, v, stamped)
        c_tgt = _features(sim.model, v, norm(jnp.asarray(tgt))).mean(0)
        c_src = _features(sim.model, v, norm(jnp.asarray(src))).mean(0)
        gaps[name] = float(np.mean(_cos(f_bd, c_tgt)) - np.mean(_cos(f_bd, c_src)))
    assert gaps["crafted"] > gaps["global"] + 0.2, gaps


@pytest.mark.slow
def test_chameleon_raises_fedavg_asr(digits, pretrained):  # noqa: F811
    sim = _sim(digits)
    g0, clean_asr = pretrained
    state = sim.init_state()._replace(global_variables=jax.tree.map(jnp.array, g0))
    for _ in range(4):
        state, m = sim.round_step(state, sim.data)
        assert int(m["num_attackers"]) == 2 and int(m["num_dropped"]) == 0
    assert sim.traces["round"] == 1
    ev = sim.eval_state(state)
    assert ev["acc"] > 80.0
    assert ev["asr"] > max(50.0, clean_asr + 30.0), (ev, clean_asr)
