"""The partial-layer attack, DBA and Neurotoxin.

* partial-layer: the layers kept for ``convs = 0, 1, 2`` (SimpleNet and ResNet-18, in call order
  with their BatchNorms); the crafted upload is exactly 0 on every excluded layer (parameters and
  BatchNorm statistics) and not on the kept ones; benign rows untouched;
* DBA: the pieces are disjoint bars (shrunk to fit 8x8 images), their union the test trigger;
* Neurotoxin: the mask keeps exactly the ``floor(ratio D)`` coordinates of smallest reference
  magnitude; the upload's parameters are 0 outside it;
* each raises FedAvg's ASR far above the clean model's within four rounds (digits, the demo
  SimpleNet with BatchNorm, 2 attackers of 10 per round, from a briefly trained clean model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax import simulation
from marsjax.attacks import _dba, _neurotoxin, _partial
from marsjax.attacks.base import CraftContext
from marsjax.config import get_preset, override
from marsjax.data import load_dataset
from marsjax.models import build_model

PRETRAIN_ROUNDS = 6
ATTACK_ROUNDS = 4
OPTIONS = {
    "partial": {"poison_steps": 30, "convs": 0},
    "dba": {"poison_epochs": 4},  # the paper's attackers train longer than benign clients
    "neurotoxin": {},
}


def test_partial_layer_kept_modules():
    small = build_model("simplenet", 10, width="small", batch_norm=True)
    assert _partial.kept_modules(small, (8, 8, 1), None) is None
    assert _partial.kept_modules(small, (8, 8, 1), 0) == (("fc1",), ("fc2",))
    assert set(_partial.kept_modules(small, (8, 8, 1), 2)) == {
        ("fc1",),
        ("fc2",),
        ("conv1",),
        ("bn1",),
        ("conv2",),
        ("bn2",),
    }
    with pytest.raises(ValueError, match="convolutions"):
        _partial.kept_modules(small, (8, 8, 1), 3)
    resnet = build_model("resnet18", 10)
    assert _partial.kept_modules(resnet, (32, 32, 3), 0) == (("fc",),)
    assert _partial.kept_modules(resnet, (32, 32, 3), 2)[1:] == (
        ("conv1",),
        ("bn1",),
        ("layer1_0", "conv1"),
        ("layer1_0", "bn1"),
    )


def test_dba_pieces_are_disjoint_and_make_the_test_trigger():
    p = _dba.dba_pieces((8, 8, 1))
    assert p.shape == (4, 8, 8, 1)
    assert p.sum(axis=(1, 2, 3)).tolist() == [3, 3, 3, 3]  # bars shrunk to fit 8 pixels
    assert p.sum(axis=0).max() == 1
    p28 = _dba.dba_pieces((28, 28, 1))
    assert p28.sum(axis=(1, 2, 3)).tolist() == [4, 4, 4, 4]
    assert np.argwhere(p28[3, :, :, 0]).tolist() == [[3, 6], [3, 7], [3, 8], [3, 9]]
    with pytest.raises(ValueError, match="fit"):
        _dba.dba_pieces((8, 8, 1), size=2, top=7, gap=1)


def test_neurotoxin_mask_keeps_the_smallest_coordinates():
    rng = np.random.default_rng(0)
    ref = {"a": rng.normal(size=(5, 6)).astype(np.float32), "b": rng.normal(size=(10,))}
    ref["b"] = ref["b"].astype(np.float32)
    mask = _neurotoxin.neurotoxin_mask(jax.tree.map(jnp.asarray, ref), 0.75)
    flat_ref = np.abs(np.concatenate([ref["a"].ravel(), ref["b"]]))
    flat_mask = np.concatenate([np.asarray(mask["a"]).ravel(), np.asarray(mask["b"])])
    assert flat_mask.sum() == 30
    assert flat_ref[flat_mask].max() < flat_ref[~flat_mask].min()


# ------------------------------------------------------------------------------------------------
# In the compiled round


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def pretrained(digits):
    cfg = override(get_preset("demo"), {"attack.name": "none", "attack.options": {}})
    sim = simulation.build(cfg, digits)
    state = sim.init_state()
    for _ in range(PRETRAIN_ROUNDS):
        state, _ = sim.round_step(state, sim.data)
    ev = sim.eval_state(state)
    assert ev["acc"] > 85.0 and ev["asr"] < 25.0
    return state.global_variables, ev["asr"]


@pytest.fixture(scope="module")
def sims(digits):
    cache = {}

    def get(name, **options):
        options = {**OPTIONS[name], **options}
        key = (name, repr(sorted(options.items())))
        if key not in cache:
            cfg = override(
                get_preset("demo"),
                {"attack.name": name, "attack.options": options, "run.seed": 1},
            )
            cache[key] = simulation.build(cfg, digits)
        return cache[key]

    return get


def _craft_rows(sim, g):
    """The attack's craft on small random updates of 10 rows (rows 0 and 3 attackers)."""
    ids = jnp.array([0, 7, 12, 3, 20, 21, 22, 23, 24, 25], jnp.int32)
    mal = jnp.array([True, False, False, True] + [False] * 6)
    updates = jax.tree.map(
        lambda x: 1e-3 * jax.random.normal(jax.random.key(1), (10,) + x.shape), g
    )
    ctx = CraftContext(g, jnp.int32(0), ids, mal, sim.data, sim.data.counts[ids])
    attack = sim.attack
    out, _ = jax.jit(attack.craft)(jax.random.key(2), updates, attack.init(g), ctx)
    return jax.tree.map(np.asarray, updates), jax.tree.map(np.asarray, out), np.asarray(mal)


@pytest.mark.parametrize("convs", [0, 1])
def test_partial_layer_leaves_the_excluded_layers_update_exactly_zero(sims, pretrained, convs):
    g = jax.tree.map(jnp.asarray, pretrained[0])
    updates, out, mal = _craft_rows(sims("partial", convs=convs), g)
    kept = {"fc1", "fc2"} | ({"conv1", "bn1"} if convs else set())
    for col in out:
        for layer, leaves in out[col].items():
            for name, x in leaves.items():
                np.testing.assert_array_equal(x[~mal], updates[col][layer][name][~mal])
                if layer in kept:
                    assert np.abs(x[mal]).max() > 0, (col, layer, name)
                else:
                    assert np.all(x[mal] == 0), (col, layer, name)
                np.testing.assert_array_equal(x[mal][0], x[mal][1])  # one shared model


def test_neurotoxin_upload_is_zero_outside_its_mask(sims, pretrained):
    g = jax.tree.map(jnp.asarray, pretrained[0])
    updates, out, mal = _craft_rows(sims("neurotoxin", reference="benign", mask_ratio=0.5), g)
    ben = jax.tree.map(lambda u: u[~mal].mean(0), updates["params"])
    mask = jax.tree.map(np.asarray, _neurotoxin.neurotoxin_mask(ben, 0.5))
    for row in np.flatnonzero(mal):
        for m, x in zip(jax.tree.leaves(mask), jax.tree.leaves(out["params"])):
            assert np.all(x[row][~m] == 0)
            assert np.abs(x[row][m]).max() > 0


@pytest.mark.parametrize("name", ["partial", "dba", "neurotoxin"])
def test_backdoor_attack_raises_fedavg_asr(sims, pretrained, name):
    sim = sims(name)
    g0, clean_asr = pretrained
    state = sim.init_state()._replace(global_variables=jax.tree.map(jnp.array, g0))
    for _ in range(ATTACK_ROUNDS):
        state, m = sim.round_step(state, sim.data)
        assert int(m["num_attackers"]) == 2 and int(m["num_dropped"]) == 0
    assert sim.traces["round"] == 1
    ev = sim.eval_state(state)
    assert ev["acc"] > 80.0
    assert ev["asr"] > max(50.0, clean_asr + 30.0), (name, ev, clean_asr)
