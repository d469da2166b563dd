"""MARS's epsilon on the Quickstart federation (digits, 8x8 SimpleNet+BN, MRA), with and without
the attack: the measurement behind the quickstart preset's epsilon of 0.1 (``marsjax presets``).

    marsjax sweep experiments/configs/quickstart_epsilon.py

The epsilon values of one column run in one compiled program, one after the other
(``lax.map``; the decisions of separate runs). No pretrained start (the Quickstart
trains from scratch, 30 rounds, the attack in every round).
"""

from marsjax.config import get_preset, override
from marsjax.sweep import Sweep

EPSILONS = [0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 1.0, 3.0]


def get_config():
    return get_preset("quickstart")


def get_sweep():
    return Sweep(
        name="quickstart_epsilon",
        base=override(get_preset("quickstart"), {"run.eval_every": 10}),
        axes={"attack.name": ["none", "mra"], "defense.options.epsilon": EPSILONS},
        cols="attack.name",
        batch_axis="defense.options.epsilon",
        out_dir="experiments/results/quickstart/epsilon",
        description=(
            "MARS on the Quickstart federation (digits, 30 clients, 10 per round with 2 "
            "attackers, MRA x5): epsilon from 0.01 to 3, without attack and under MRA."
        ),
    )
