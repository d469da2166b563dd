"""MARS end to end on the simulator (digits, SimpleNet with BN): the Quickstart setting."""

import pytest

from marsjax import simulation
from marsjax.config import get_preset, override
from marsjax.data import load_dataset

ROUNDS = 12


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _run(digits, defense, attack="mra"):
    cfg = get_preset("quickstart", defense=defense)
    changes = {"run.rounds": ROUNDS, "run.eval_every": ROUNDS}
    if attack == "none":
        changes.update({"attack.name": "none", "attack.options": {}})
    return simulation.run(override(cfg, changes), dataset=digits, progress=False)["summary"]


@pytest.fixture(scope="module")
def clean(digits):
    return _run(digits, "mars", attack="none")


def test_mars_accepts_everyone_without_attack(clean):
    # epsilon = 0.1 on this model (the preset explains why not the paper's 0.03)
    assert clean["fpr"] <= 5.0
    assert clean["acc"] > 90.0


def test_mars_rejects_model_replacement_fedavg_does_not(digits, clean):
    mars = _run(digits, "mars")
    fedavg = _run(digits, "fedavg")
    print("clean", clean, "\nmars", mars, "\nfedavg", fedavg)
    assert mars["tpr"] >= 95.0 and mars["fpr"] <= 5.0
    assert mars["asr"] <= clean["asr"] + 10.0  # near the clean level
    assert fedavg["asr"] >= 80.0  # the attack works when nobody filters
    assert mars["acc"] > 90.0
