"""Table 8 at CPU scale: MARS's no-attack threshold epsilon, with and without 3DFed.

    marsjax sweep experiments/configs/table8_epsilon_fmnist_cpu.py

The epsilon values of one attack run TOGETHER as one compiled program (``batch_axis``): MARS
keeps epsilon in its state (``MarsState.epsilon``), so one program runs the nine states one
after the other (``lax.map``); each value is an independent run that takes exactly the decisions
of its separate run (its own accepted clients and global model). The paper's
grid (0.01 ... 5, CIFAR-10) is extended to 10 because epsilon is in units of backdoor energy,
which depend on the model (experiments/README.md).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.config import override
from marsjax.sweep import Sweep

EPSILONS = [0.01, 0.02, 0.03, 0.1, 0.3, 1.0, 3.0, 5.0, 10.0]


def get_config():
    return _setup.with_start(_setup.fmnist_cpu(), _setup.cpu_pretrain())


def get_sweep():
    base = override(_setup.fmnist_cpu(), {"run.eval_every": _setup.CPU_ROUNDS})
    return Sweep(
        name="table8_epsilon_fmnist_cpu",
        base=base,
        axes={"attack.name": ["none", "3dfed"], "defense.options.epsilon": EPSILONS},
        cols="attack.name",
        attack_options=_setup.cpu_attack_options(),
        batch_axis="defense.options.epsilon",
        pretrain=_setup.cpu_pretrain(),
        out_dir=str(_setup.RESULTS / "fmnist_cpu" / "table8_epsilon"),
        description=(
            "MARS (kappa 5%) for epsilon from 0.01 to 10, without attack (FPR) and under 3DFed "
            "(TPR/FPR), CPU-scale setting; the epsilon values of one column ran in one compiled "
            "program (lax.map), with the decisions of separate runs."
        ),
    )
