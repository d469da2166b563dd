import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax import simulation
from marsjax.config import get_preset, override
from marsjax.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _cfg(**changes):
    cfg = get_preset("demo", defense="fedavg")
    base = {"run.rounds": 4, "run.eval_every": 2}
    base.update(changes)
    return override(cfg, base)


def test_sampling_exact_attackers_and_no_repeats():
    for s in range(20):
        ids, mal = simulation.sample_clients(jax.random.key(s), 100, 20, 20, 4)
        ids, mal = np.asarray(ids), np.asarray(mal)
        assert len(set(ids.tolist())) == 20
        assert mal.sum() == 4 and np.all(ids[mal] < 20) and np.all(ids[~mal] >= 20)
    # attackers are not always in the first rows
    firsts = [
        np.asarray(simulation.sample_clients(jax.random.key(s), 100, 20, 20, 4)[1])[:4].all()
        for s in range(20)
    ]
    assert not all(firsts)
    ids, mal = simulation.sample_clients(jax.random.key(0), 100, 20, 20, None)
    assert len(set(np.asarray(ids).tolist())) == 20
    assert np.array_equal(np.asarray(mal), np.asarray(ids) < 20)


def test_round_traced_once_and_strategies_agree(digits):
    sims = {s: simulation.build(_cfg(), digits, client_strategy=s) for s in ("vmap", "map")}
    out = {}
    for s, sim in sims.items():
        state = sim.init_state()
        recs = []
        for _ in range(3):
            state, m = sim.round_step(state, sim.data)
            recs.append(m)
        assert sim.traces["round"] == 1
        out[s] = (state, recs)
    a, b = out["vmap"][0].global_variables, out["map"][0].global_variables
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=2e-5)
    for ma, mb in zip(out["vmap"][1], out["map"][1]):
        np.testing.assert_array_equal(np.asarray(ma["client_ids"]), np.asarray(mb["client_ids"]))


def test_attack_choice_does_not_change_partition_or_sampling(digits):
    a = simulation.run(
        _cfg(**{"attack.name": "none", "attack.options": {}}), dataset=digits, progress=False
    )
    b = simulation.run(_cfg(), dataset=digits, progress=False)
    assert [r["client_ids"] for r in a["records"]] == [r["client_ids"] for r in b["records"]]
    assert np.array_equal(a["sim"].partition.indices, b["sim"].partition.indices)


def test_scan_of_rounds_equals_single_rounds(digits):
    one = simulation.run(_cfg(), dataset=digits, progress=False)
    two = simulation.run(_cfg(**{"run.rounds_per_call": 2}), dataset=digits, progress=False)
    for x, y in zip(
        jax.tree.leaves(one["state"].global_variables),
        jax.tree.leaves(two["state"].global_variables),
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_fedavg_learns_and_badnets_backdoors(digits, tmp_path):
    clean = simulation.run(
        _cfg(
            **{"run.rounds": 15, "run.eval_every": 15, "attack.name": "none", "attack.options": {}}
        ),
        dataset=digits,
        progress=False,
    )
    attacked = simulation.run(
        _cfg(**{"run.rounds": 15, "run.eval_every": 15, "run.out_dir": str(tmp_path / "r")}),
        dataset=digits,
        progress=False,
    )
    c, a = clean["summary"], attacked["summary"]
    print("clean", c, "\nattacked", a)
    assert c["acc"] > 85.0
    assert c["asr"] < 30.0
    assert a["asr"] > c["asr"] + 50.0
    assert a["tpr"] == 0.0 and a["fpr"] == 0.0  # FedAvg flags nobody
    # results folder
    files = {p.name for p in (tmp_path / "r").iterdir()}
    assert {"config.json", "metrics.jsonl", "summary.json", "summary.md", "curves.png"} <= files
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().strip().splitlines()
    assert len(lines) == 15


def test_nonfinite_upload_is_dropped_and_model_stays_finite(digits):
    from marsjax.attacks import REGISTRY, Attack, EmptyState

    def nan_attack(ctx):
        def craft(key, updates, state, c):
            bad = c.is_malicious
            return jax.tree.map(
                lambda u: jnp.where(bad.reshape((-1,) + (1,) * (u.ndim - 1)), jnp.nan, u), updates
            ), state

        return Attack(lambda v: EmptyState(), lambda k, x, y, s: (x, y), craft, lambda x, s: x)

    REGISTRY["_nan_test"] = nan_attack
    try:
        res = simulation.run(
            _cfg(**{"attack.name": "_nan_test", "attack.options": {}}),
            dataset=digits,
            progress=False,
        )
    finally:
        del REGISTRY["_nan_test"]
    assert all(r["num_dropped"] == 2 for r in res["records"])
    assert all(r["tpr"] == 100.0 for r in res["records"])  # dropped = flagged
    # the rows dropped are the attackers'; over the judged rows no attacker is left to rate
    assert all(r["dropped"] == r["is_attacking"] for r in res["records"])
    assert all(r["tpr_excl_dropped"] is None for r in res["records"])
    assert all(r["fpr_excl_dropped"] == r["fpr"] for r in res["records"])
    assert math.isnan(res["summary"]["tpr_excl_dropped"]) and res["summary"]["tpr"] == 100.0
    for leaf in jax.tree.leaves(res["state"].global_variables):
        assert np.all(np.isfinite(np.asarray(leaf)))


def test_sampled_partition_federation_larger_than_the_dataset(digits):
    # 20,000 registered clients on 1,437 training images: each holds 5 distinct random samples
    cfg = _cfg(
        **{
            "data.num_clients": 20000,
            "data.partition": "sampled",
            "data.samples_per_client": 5,
            "run.rounds": 2,
        }
    )
    sim = simulation.build(cfg, digits)
    assert sim.partition.indices.shape == (20000, 5) and np.all(sim.partition.counts == 5)
    state = sim.init_state()
    state, m = sim.round_step(state, sim.data)
    ids = np.asarray(m["client_ids"])
    assert len(set(ids.tolist())) == ids.size and ids.max() < 20000
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.global_variables))
    with pytest.raises(ValueError, match="samples_per_client"):
        simulation.build(override(cfg, {"data.samples_per_client": 10**6}), digits)


def test_floyd_draw_is_uniform_over_subsets_and_orders(monkeypatch):
    # the draw used for pools above FLOYD_MIN_POOL, forced on a small pool to count outcomes
    from scipy import stats

    monkeypatch.setattr(simulation, "FLOYD_MIN_POOL", 0)
    pool, m, n = 7, 3, 42000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: simulation._choice(k, pool, m)))(keys))
    assert np.all((draws >= 0) & (draws < pool))
    assert np.all(np.sort(draws, 1)[:, 1:] != np.sort(draws, 1)[:, :-1])  # distinct
    # every ordered triple (7 * 6 * 5 = 210) equally likely: chi-square goodness of fit
    code = (draws[:, 0] * pool + draws[:, 1]) * pool + draws[:, 2]
    counts = np.bincount(code, minlength=pool**3)
    seen = counts[counts > 0]
    assert seen.size == 210
    assert stats.chisquare(seen).pvalue > 1e-3


def test_sampling_from_a_million_registered_clients():
    ids, mal = jax.jit(lambda k: simulation.sample_clients(k, 10**6, 2 * 10**5, 100, 20))(
        jax.random.key(1)
    )
    ids, mal = np.asarray(ids), np.asarray(mal)
    assert len(set(ids.tolist())) == 100 and mal.sum() == 20
    assert np.all(ids[mal] < 2 * 10**5) and np.all((ids[~mal] >= 2 * 10**5) & (ids[~mal] < 10**6))
