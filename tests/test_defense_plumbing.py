"""What the round hands to the defenses: the client ids of the rows, and the facts of the context.

The round shuffles its rows every round, so a defense that keeps per-client state (FoolsGold's
history, FLDetector's last updates and distances) must key it by client id. These tests run the
compiled round with the rows shuffled (as always) and with the same clients in id order, and
require the same defense state; FoolsGold's weights are checked against a numpy transcription of
the 3DFed repository's algorithm over several rounds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax import defenses, simulation
from marsjax.config import get_preset, override
from marsjax.data import load_dataset
from marsjax.defenses import _foolsgold


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _cfg(defense, **changes):
    cfg = get_preset("demo", defense="fedavg")
    base = {
        "model.name": "mlp",
        "data.num_clients": 12,
        "run.clients_per_round": 8,
        "attack.num_attackers": 3,
        "attack.attackers_per_round": 2,
        "run.rounds": 5,
        "run.eval_every": 5,
        "train.local_epochs": 1,
        "defense.name": defense,
        "defense.options": {},
    }
    base.update(changes)
    return override(cfg, base)


def _sorted_sampler(key, *args):
    ids, mal = _ORIGINAL_SAMPLER(key, *args)
    order = jnp.argsort(ids)
    return ids[order], mal[order]


_ORIGINAL_SAMPLER = simulation.sample_clients


def _run(cfg, digits, monkeypatch, in_id_order):
    if in_id_order:
        monkeypatch.setattr(simulation, "sample_clients", _sorted_sampler)
    else:
        monkeypatch.setattr(simulation, "sample_clients", _ORIGINAL_SAMPLER)
    sim = simulation.build(cfg, digits)
    state = sim.init_state()
    records = []
    for _ in range(cfg.run.rounds):
        state, m = sim.round_step(state, sim.data)
        records.append(jax.tree.map(np.asarray, m))
    return state, records


def _by_id(records, field):
    """Per round: client id -> the row's value of ``field``."""
    return [dict(zip(r["client_ids"].tolist(), r[field].tolist(), strict=True)) for r in records]


@pytest.mark.parametrize("defense", ["foolsgold", "fldetector"])
def test_stateful_defenses_follow_clients_not_rows(defense, digits, monkeypatch):
    opts = {"window": 2} if defense == "fldetector" else {}
    cfg = _cfg(defense, **{"defense.options": opts})
    shuffled, rec_s = _run(cfg, digits, monkeypatch, in_id_order=False)
    ordered, rec_o = _run(cfg, digits, monkeypatch, in_id_order=True)
    # the rows really were in a different order in some round
    assert any(not np.array_equal(a["client_ids"], b["client_ids"]) for a, b in zip(rec_s, rec_o))
    for a, b in zip(_by_id(rec_s, "accepted"), _by_id(rec_o, "accepted")):
        assert a.keys() == b.keys()
        for cid in a:
            np.testing.assert_allclose(a[cid], b[cid], rtol=1e-5, atol=1e-6)
    for x, y in zip(
        jax.tree.leaves(shuffled.defense_state), jax.tree.leaves(ordered.defense_state)
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
    if defense == "foolsgold":
        # the history holds exactly the clients that took part
        seen = sorted({c for r in rec_s for c in r["client_ids"].tolist()})
        rows = np.flatnonzero(np.abs(np.asarray(shuffled.defense_state.history)).sum(1) > 0)
        assert rows.tolist() == seen
    else:
        last = np.asarray(shuffled.defense_state.last_round)
        for t, r in enumerate(rec_s):
            for cid in r["client_ids"].tolist():
                assert last[cid] >= t  # seen in round t (or later), keyed by its id
        assert np.all(last[[c for c in range(12) if c not in set(rec_s[-1]["client_ids"])]] < 4)


def _np_foolsgold_3dfed(hist):
    """The 3DFed repository's ``Foolsgold.aggr`` on the rows of ``hist``, in numpy."""
    n = len(hist)
    unit = hist / np.linalg.norm(hist, axis=1, keepdims=True)
    cs = unit @ unit.T - np.eye(n)
    maxcs = np.max(cs, axis=1) + 1e-5
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j]:
                cs[i][j] = cs[i][j] * maxcs[i] / maxcs[j]
    wv = 1 - np.max(cs, axis=1)
    wv[wv > 1] = 1
    wv[wv < 0] = 0
    wv = wv / np.max(wv)
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = np.log(wv / (1 - wv) + 1e-5) + 0.5
    wv[(np.isinf(wv) + wv) > 1] = 1
    wv[wv < 0] = 0
    return wv


def test_foolsgold_history_matches_3dfed_reference_over_rounds():
    rng = np.random.default_rng(3)
    num_clients, n, rounds = 10, 6, 6
    # output layer "Dense_1" (kernel + bias, what the 3DFed code's `'fc2' in name` selects) and
    # a hidden layer that must not count
    shapes = {
        "Dense_0": {"kernel": (5, 4), "bias": (4,)},
        "Dense_1": {"kernel": (4, 3), "bias": (3,)},
    }
    g = {
        "params": jax.tree.map(
            lambda s: jnp.zeros(s), shapes, is_leaf=lambda x: isinstance(x, tuple)
        )
    }
    fg = _foolsgold.foolsgold(num_clients, layers="output", output_layer="Dense_1")
    state = fg.init(g)
    apply = jax.jit(fg.apply)
    # two sybils (ids 0, 1) push the same direction, the rest are independent
    sybil = rng.normal(size=15)
    history = {}
    for t in range(rounds):
        others = 2 + rng.permutation(num_clients - 2)[: n - 2]
        ids = rng.permutation(np.concatenate([[0, 1], others]))
        out = rng.normal(size=(n, 15))
        out[np.isin(ids, [0, 1])] = sybil + 0.05 * rng.normal(size=(2, 15))
        hidden = rng.normal(size=(n, 24))
        updates = {
            "params": {
                "Dense_0": {"kernel": hidden[:, :20].reshape(n, 5, 4), "bias": hidden[:, 20:]},
                "Dense_1": {"kernel": out[:, :12].reshape(n, 4, 3), "bias": out[:, 12:]},
            }
        }
        updates = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), updates)
        res, state = apply(
            jax.random.key(t),
            updates,
            state,
            global_variables=g,
            client_weights=jnp.ones(n),
            client_ids=jnp.asarray(ids, jnp.int32),
        )
        for row, cid in enumerate(ids):
            history[cid] = history.get(cid, 0) + out[row]
        ref = _np_foolsgold_3dfed(np.stack([history[c] for c in ids]))
        np.testing.assert_allclose(np.asarray(res.accepted), ref, atol=2e-4)
        assert np.all(np.asarray(res.accepted)[np.isin(ids, [0, 1])] == 0)
    assert sum(1 for c in history if c not in (0, 1)) >= 2


def test_context_carries_the_server_rule_and_training(digits, monkeypatch):
    seen = {}
    real_make = defenses.make

    def spy(name, ctx, **options):
        seen["ctx"] = ctx
        return real_make(name, ctx, **options)

    monkeypatch.setattr(defenses, "make", spy)
    cfg = _cfg("fedavg", **{"run.server_rule": "sum", "run.eta": 0.5, "train.lr": 0.07})
    simulation.build(cfg, digits)
    ctx = seen["ctx"]
    assert (ctx.server_rule, ctx.server_lr, ctx.eta) == ("sum", 1.0, 0.5)
    assert ctx.train == cfg.train and ctx.train.lr == 0.07
    assert not hasattr(ctx, "run")  # what defenses read is declared, field by field


def test_indicator_plants_its_full_strength_under_the_sum_rule(digits):
    """Under the official rule the round moves the model by eta / num_clients * (accepted weight)
    times the aggregate; the indicator must divide its implant by that same factor, so that the
    next global model carries the whole implant. Reading the rule from a context field that did
    not exist, it assumed the mean rule (factor 1) and planted ~13 % of the implant."""
    from marsjax.aggregation import rule_scale
    from marsjax.client import make_normalize
    from marsjax.config import TrainConfig
    from marsjax.models import build_model

    model = build_model("simplenet", 10, width="small", batch_norm=True)
    ctx = defenses.DefenseContext(
        model=model,
        num_clients=100,
        clients_per_round=20,
        attackers_per_round=4,
        num_classes=10,
        image_shape=digits.image_shape,
        normalize=make_normalize(digits.mean, digits.std),
        server_rule="sum",
        server_lr=1.0,
        eta=0.8,
        train=TrainConfig(),
    )
    ind = defenses.make("indicator", ctx, num_ood=256, epochs=30, lr=0.02)
    g0 = model.init(jax.random.key(0), jnp.zeros((1, *digits.image_shape), jnp.float32))
    rng = np.random.default_rng(0)
    ups = jax.tree.map(
        lambda a: jnp.asarray(0.01 * rng.normal(size=(20, *a.shape)), jnp.float32), g0
    )
    apply = jax.jit(ind.apply)
    kw = {"client_weights": jnp.ones(20), "client_ids": jnp.arange(20, dtype=jnp.int32)}
    res, st = apply(jax.random.key(1), ups, ind.init(g0), global_variables=g0, **kw)
    assert bool(st.implanted)
    scale = rule_scale("sum", jnp.sum(res.accepted), server_lr=1.0, eta=0.8, num_clients=100)
    assert 0.15 < float(scale) < 0.17  # 20 accepted of 100, eta 0.8
    g1 = jax.tree.map(lambda g, u: g + scale * u, g0, res.update)  # what the round applies
    # Next round, a zero upload is the global model itself: its score is the indicator accuracy.
    zeros = jax.tree.map(jnp.zeros_like, ups)
    res2, _ = apply(jax.random.key(2), zeros, st, global_variables=g1, **kw)
    acc = np.asarray(res2.scores)
    assert np.all(acc >= 0.85), acc  # the whole implant is in the broadcast model
    # and a model that got only `scale` of the implant would not carry it
    weak = jax.tree.map(lambda a, b: a + scale * (b - a), g0, g1)
    res3, _ = apply(jax.random.key(2), zeros, st, global_variables=weak, **kw)
    assert np.all(np.asarray(res3.scores) < 0.85)
