"""Table 9: MARS's kappa (the top-% of channels per layer kept in CBE) under 3DFed, CIFAR-10.
Kappa changes CBE's length, so every value compiles its own program.

    marsjax sweep experiments/configs/table9_kappa.py --set data.data_dir=DIR
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.sweep import Sweep

KAPPAS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0]


def get_config():
    return _setup.with_start(_setup.cifar10(), _setup.paper_pretrain("cifar10"))


def get_sweep():
    return Sweep(
        name="table9_kappa",
        base=_setup.cifar10(),
        axes={"defense.options.kappa": KAPPAS, "attack.name": ["3dfed"]},
        cols="attack.name",
        pretrain=_setup.paper_pretrain("cifar10"),
        checkpoint_every=5,
        out_dir=str(_setup.RESULTS / "cifar10" / "table9_kappa"),
        description="Table 9: MARS kappa sweep (epsilon 0.03) under 3DFed.",
    )
