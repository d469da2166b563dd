"""marsjax.pretrain: clean FedAvg to a target accuracy, the checkpoint an attack run starts from."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from marsjax import checkpoint, simulation
from marsjax.config import ConfigError, get_preset, override
from marsjax.data import load_dataset
from marsjax.pretrain import clean_config, pretrain


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _cfg():
    # The quickstart federation (MRA vs MARS): pretraining must drop its attack and defense.
    return override(
        get_preset("quickstart"),
        {"run.clients_per_round": 6, "attack.attackers_per_round": 2, "train.local_steps": 2},
    )


def test_clean_config_drops_attack_and_defense():
    c = clean_config(_cfg())
    assert c.attack.name == "none" and c.attack.options == {}
    assert c.defense.name == "fedavg" and c.defense.options == {}
    assert c.data == _cfg().data and c.train == _cfg().train


@pytest.mark.slow
def test_pretrain_stops_at_target_and_attack_runs_start_from_it(tmp_path, digits):
    out = tmp_path / "pre"
    # Far-off target: trains max_rounds; evaluations every round give the accuracy curve.
    res = pretrain(
        _cfg(), out, target_acc=99.9, max_rounds=3, eval_every=1, dataset=digits, progress=False
    )
    assert res.rounds == 3 and not res.reached
    curve = [r["acc"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert len(curve) == 3

    # A target the curve reaches: a fresh pretraining stops at the first evaluation reaching it.
    target = sorted(curve)[1]  # reached at round index curve.index(...) at the latest
    first = next(i for i, a in enumerate(curve) if a >= target) + 1
    out2 = tmp_path / "pre2"
    res2 = pretrain(
        _cfg(), out2, target_acc=target, max_rounds=3, eval_every=1, dataset=digits, progress=False
    )
    assert res2.reached and res2.rounds == first
    assert res2.acc == pytest.approx(curve[first - 1], abs=1e-4)
    saved = json.loads((out2 / "pretrain.json").read_text())
    assert (
        saved["checkpoint"] == f"checkpoints/{first}"
        and saved["config"]["attack"]["name"] == "none"
    )
    assert checkpoint.latest_round(out2) == first
    assert (out2 / "curves.png").exists()
    assert not list(out2.rglob("commit_success.txt"))  # orbax's markers name the absolute path

    # Done once: a second call does nothing; another experiment in the folder is refused.
    again = pretrain(
        _cfg(), out2, target_acc=target, max_rounds=3, eval_every=1, dataset=digits, progress=False
    )
    assert again.skipped and again.rounds == first
    with pytest.raises(ConfigError, match="train.lr"):
        pretrain(
            override(_cfg(), {"train.lr": 0.2}),
            out2,
            target_acc=target,
            max_rounds=3,
            eval_every=1,
            dataset=digits,
            progress=False,
        )

    # The attack experiment (quickstart: MRA vs MARS) starts from the pretrained global model.
    cfg = override(_cfg(), {"run.init_checkpoint": str(out2), "run.rounds": 1})
    sim = simulation.build(cfg, digits)
    start = sim.init_state()
    like = simulation.build(clean_config(_cfg()), digits).init_state().global_variables
    saved_model = checkpoint.load_variables(out2 / "checkpoints" / str(first), like)
    for a, b in zip(jax.tree.leaves(start.global_variables), jax.tree.leaves(saved_model)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # ... which is the model pretraining evaluated at that round (not a fresh random one)
    assert sim.eval_state(start)["acc"] == pytest.approx(res2.acc, abs=1e-3)
    random_acc = float(sim.evaluate(like, start.attack_state, sim.x_test, sim.y_test)["acc"])
    assert random_acc != pytest.approx(res2.acc, abs=1e-3)
