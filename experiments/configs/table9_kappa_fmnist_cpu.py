"""Table 9 at CPU scale: MARS's kappa under 3DFed (Fashion-MNIST, SimpleNet+BN).

    marsjax sweep experiments/configs/table9_kappa_fmnist_cpu.py

SimpleNet+BN has two scored layers (20 and 50 channels), so kappa keeps 1+1 channels at 1-2%,
1+3 at 5%, 2+5 at 10%, ... and all 70 at 100%. Each kappa compiles its own program.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.config import override
from marsjax.sweep import Sweep

KAPPAS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]


def get_config():
    return _setup.with_start(_setup.fmnist_cpu(), _setup.cpu_pretrain())


def get_sweep():
    base = override(_setup.fmnist_cpu(), {"run.eval_every": _setup.CPU_ROUNDS})
    return Sweep(
        name="table9_kappa_fmnist_cpu",
        base=base,
        axes={"defense.options.kappa": KAPPAS, "attack.name": ["3dfed"]},
        cols="attack.name",
        attack_options=_setup.cpu_attack_options(),
        pretrain=_setup.cpu_pretrain(),
        out_dir=str(_setup.RESULTS / "fmnist_cpu" / "table9_kappa"),
        description="MARS kappa sweep under 3DFed, CPU-scale setting.",
    )
