"""Table 3 at CPU scale: the adaptive attack on MARS (CE + lambda * backdoor energy), MARS vs
MARS*, Fashion-MNIST (SimpleNet+BN).

    marsjax sweep experiments/configs/table3_adaptive_fmnist_cpu.py
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.config import override
from marsjax.sweep import Sweep

LAMBDAS = [1e-4, 1e-3, 0.01, 0.05, 0.1]


def get_config():
    cfg = override(
        _setup.fmnist_cpu(),
        {"attack.name": "adaptive", "attack.options": {"lam": 0.05, "poison_steps": 30}},
    )
    return _setup.with_start(cfg, _setup.cpu_pretrain())


def get_sweep():
    base = override(
        _setup.fmnist_cpu(),
        {"attack.name": "adaptive", "attack.options": _setup.cpu_attack_options()["adaptive"]},
    )
    return Sweep(
        name="table3_adaptive_fmnist_cpu",
        base=base,
        axes={"attack.options.lam": LAMBDAS, "defense.name": ["mars", "mars_star"]},
        cols="defense.name",
        defense_options=_setup.cpu_defense_options(),
        pretrain=_setup.cpu_pretrain(),
        out_dir=str(_setup.RESULTS / "fmnist_cpu" / "table3_adaptive"),
        description=(
            "Table 3 at CPU scale: adaptive attack (paper form, lambda sweep) vs MARS and MARS*."
        ),
    )
