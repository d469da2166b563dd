"""MARS end to end on the simulator (digits, SimpleNet with BN): the Quickstart setting."""

import pytest

from marsjax import simulation
from marsjax.config import get_preset, override
from marsjax.data import load_dataset

ROUNDS = 12


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _run(digits, defense, attack="mra", eval_every=ROUNDS, records=False):
    cfg = get_preset("quickstart", defense=defense)
    changes = {"run.rounds": ROUNDS, "run.eval_every": eval_every}
    if attack == "none":
        changes.update({"attack.name": "none", "attack.options": {}})
    out = simulation.run(override(cfg, changes), dataset=digits, progress=False)
    return (out["summary"], out["records"]) if records else out["summary"]


@pytest.fixture(scope="module")
def clean(digits):
    return _run(digits, "mars", attack="none")


def test_mars_accepts_everyone_without_attack(clean):
    # epsilon = 0.1 on this model (the preset explains why not the paper's 0.03)
    assert clean["fpr"] <= 5.0
    assert clean["acc"] > 90.0


def test_mars_rejects_model_replacement_fedavg_does_not(digits, clean):
    mars = _run(digits, "mars")
    # Under FedAvg, model replacement (x5 from 2 of 10 clients) swings the model: the ASR is
    # high in the first rounds and can fall back in between (it is 98.6 after the Quickstart's
    # 30 rounds), so FedAvg's ASR is read every 2 rounds.
    fedavg, records = _run(digits, "fedavg", eval_every=2, records=True)
    fedavg_asr = [r["asr"] for r in records if r.get("asr") is not None]
    print("clean", clean, "\nmars", mars, "\nfedavg ASR per 2 rounds", fedavg_asr)
    assert mars["tpr"] >= 95.0 and mars["fpr"] <= 5.0
    assert mars["asr"] <= clean["asr"] + 10.0  # near the clean level
    assert max(fedavg_asr) >= 80.0  # the attack works when nobody filters
    assert fedavg["tpr"] == 0.0
    assert mars["acc"] > 90.0
