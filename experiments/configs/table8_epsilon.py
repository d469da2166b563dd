"""Table 8: MARS's epsilon, with and without 3DFed (CIFAR-10). The epsilon values of one column
run in one compiled program, one after the other (``lax.map`` over ``MarsState.epsilon``).

    marsjax sweep experiments/configs/table8_epsilon.py --set data.data_dir=DIR
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.sweep import Sweep

EPSILONS = [0.01, 0.02, 0.03, 0.05, 0.1, 0.5, 1.0, 3.0, 5.0]


def get_config():
    return _setup.with_start(_setup.cifar10(), _setup.paper_pretrain("cifar10"))


def get_sweep():
    return Sweep(
        name="table8_epsilon",
        base=_setup.cifar10(),
        axes={"attack.name": ["none", "3dfed"], "defense.options.epsilon": EPSILONS},
        cols="attack.name",
        batch_axis="defense.options.epsilon",
        pretrain=_setup.paper_pretrain("cifar10"),
        out_dir=str(_setup.RESULTS / "cifar10" / "table8_epsilon"),
        description="Table 8: MARS epsilon sweep (kappa 5%), with and without 3DFed.",
    )
