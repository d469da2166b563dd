"""Table 2 at CPU scale: Fashion-MNIST, MRA / CerP / 3DFed x the paper's 9 defenses.

    marsjax sweep experiments/configs/table2_fmnist_cpu.py

What was scaled down from the paper's setting is listed in ``_setup.fmnist_cpu`` and
``experiments/README.md``. ``get_config()`` is the headline cell (3DFed vs MARS).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.sweep import Sweep


def get_config():
    return _setup.with_start(_setup.fmnist_cpu(), _setup.cpu_pretrain())


def get_sweep():
    return Sweep(
        name="table2_fmnist_cpu",
        base=_setup.fmnist_cpu(),
        # Defenses outer: the runs go defense by defense (MARS last).
        axes={"defense.name": list(_setup.DEFENSES), "attack.name": list(_setup.ATTACKS)},
        cols="attack.name",
        attack_options=_setup.cpu_attack_options(),
        defense_options=_setup.cpu_defense_options(),
        no_detection=_setup.NO_DETECTION,
        pretrain=_setup.cpu_pretrain(),
        out_dir=str(_setup.RESULTS / "fmnist_cpu" / "table2"),
        description=(
            "Table 2 at CPU scale (Fashion-MNIST, SimpleNet+BN, 100 clients, 20 per round with "
            "4 attackers, 12 attack rounds from a clean FedAvg start at 85%); see "
            "experiments/README.md for what was scaled down."
        ),
    )
