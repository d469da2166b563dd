"""Determinism (DESIGN principle 5): one seed gives one run, bit for bit; streams are independent.

``tests/test_simulation.py`` checks the basics (the final model and ACC of two runs agree, the
attack does not change the partition or the sampled ids). Here: two independently built runs agree
in every record, every file line and every leaf of the final state (server optimizer, defense and
attack states and key included); another seed changes the partition, the initial model and the
sampling; the sampled clients of a round are a function of (seed, round) alone, so
that nothing else in the config (attack, defense, training) can move them; the partition and the
initial model do not depend on the attack, the defense, the training or the server's data.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from marsjax import simulation
from marsjax.config import get_preset, override
from marsjax.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _cfg(**changes):
    base = {"run.rounds": 4, "run.eval_every": 2}
    return override(get_preset("demo", defense="fedavg"), {**base, **changes})


def _leaves(tree) -> list[np.ndarray]:
    out = []
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.array(x))
    return out


def _ordered(records) -> list[list]:
    """Records without the wall-clock time, as ordered (key, value) lists."""
    return [[(k, v) for k, v in r.items() if k != "elapsed_s"] for r in records]


@pytest.fixture(scope="module")
def runs(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("det")
    a = simulation.run(_cfg(**{"run.out_dir": str(out / "a")}), dataset=digits, progress=False)
    b = simulation.run(_cfg(**{"run.out_dir": str(out / "b")}), dataset=digits, progress=False)
    c = simulation.build(_cfg(**{"run.seed": 1}), digits)  # built only: no compilation
    return {"a": a, "b": b, "c": c, "out": out}


def test_same_seed_same_records_files_and_state(runs):
    a, b = runs["a"], runs["b"]
    assert a["sim"] is not b["sim"]  # two builds, two compilations
    assert _ordered(a["records"]) == _ordered(b["records"])
    la, lb = _leaves(a["state"]), _leaves(b["state"])
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    lines = {
        k: [json.loads(s) for s in (runs["out"] / k / "metrics.jsonl").read_text().splitlines()]
        for k in ("a", "b")
    }
    assert _ordered(lines["a"]) == _ordered(lines["b"]) == _ordered(a["records"])
    sa, sb = (
        {
            k: v
            for k, v in json.loads((runs["out"] / k / "summary.json").read_text()).items()
            if k not in ("wall_s", "provenance")  # provenance: the command and time differ
        }
        for k in ("a", "b")
    )
    assert sa == sb


def _sampled(cfg, seed: int, rnd: int) -> tuple[list, list]:
    """The documented sampling stream: ``fold_in(fold_in(key(seed), round), STREAM_SAMPLE)``."""
    base = jax.random.fold_in(jax.random.key(seed), rnd)
    ids, mal = simulation.sample_clients(
        jax.random.fold_in(base, simulation.STREAM_SAMPLE),
        cfg.data.num_clients,
        cfg.attack.num_attackers,
        cfg.run.clients_per_round,
        cfg.attack.attackers_per_round,
    )
    return np.asarray(ids).tolist(), np.asarray(mal).tolist()


def test_sampled_clients_are_a_function_of_seed_and_round_only(runs):
    """Nothing but (seed, round) enters the sampling key, so no other field can move it."""
    for rec in runs["a"]["records"]:
        ids, mal = _sampled(_cfg(), 0, rec["round"])
        assert rec["client_ids"] == ids
        assert rec["is_attacking"] == mal  # the attack is active in every round


def test_other_seed_changes_partition_init_and_sampling(runs):
    a, c = runs["a"]["sim"], runs["c"]
    assert not np.array_equal(a.partition.indices, c.partition.indices)
    init_a = _leaves(a.init_state().global_variables)
    init_c = _leaves(c.init_state().global_variables)
    assert all(not np.array_equal(x, y) for x, y in zip(init_a, init_c) if x.std() > 0)
    assert [_sampled(_cfg(), 0, r)[0] for r in range(4)] != [
        _sampled(_cfg(), 1, r)[0] for r in range(4)
    ]


@pytest.mark.parametrize(
    "changes",
    [
        {"attack.name": "none", "attack.options": {}},
        {"attack.options.scale": 7.0, "attack.poison_fraction": 0.2, "attack.target_label": 3},
        {"train.lr": 0.2, "train.local_epochs": 1, "train.batch_size": 8},
        {"run.server_lr": 0.5, "run.server_rule": "sum", "run.rounds": 9},
        {"data.server_samples": 7},
    ],
    ids=["attack", "attack-options", "training", "server", "server-data"],
)
def test_partition_and_initial_model_do_not_depend_on_the_rest(runs, digits, changes):
    """Built, not run: the partition and the initial model are fixed by the seed and the data."""
    a = runs["a"]["sim"]
    other = simulation.build(_cfg(**changes), digits)
    np.testing.assert_array_equal(a.partition.indices, other.partition.indices)
    np.testing.assert_array_equal(a.partition.counts, other.partition.counts)
    for x, y in zip(
        _leaves(a.init_state().global_variables), _leaves(other.init_state().global_variables)
    ):
        np.testing.assert_array_equal(x, y)
