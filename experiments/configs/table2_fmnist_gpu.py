"""Table 2 in the paper's MNIST setting, on Fashion-MNIST (no reductions; 12-45 s per run on one
H200, 4-5.5 min on 2 CPU cores, DeepSight much longer).

    marsjax sweep experiments/configs/table2_fmnist_gpu.py --set data.data_dir=DIR

The paper's MNIST experiment (``_setup.mnist``: SimpleNet (paper width) + BN, 100 clients,
Dirichlet 0.9, 20 per round with exactly 4 attackers, 2 local epochs, attackers at lr 0.055 for
15 epochs, the official server rule ``global += 0.8/100 * sum``, 31 attack rounds, ACC/ASR every
round, 3DFed's MNIST constants, MARS at the paper's ε = 0.03 and κ = 5 %) with one change: the
data are Fashion-MNIST, the dataset the Debian package ``dataset-fashion-mnist`` ships (MNIST is
not available offline here). Nothing is scaled down; compare ``table2_fmnist_cpu.py``, which is.

The clean start is the CPU-scale clean start (``experiments/results/fmnist_cpu/pretrain``: the
same SimpleNet+BN, FedAvg on Fashion-MNIST to 86.2 % test accuracy), reused so that a GPU session
spends its time on the attack rounds; the official MNIST run likewise resumes a clean model.
``get_config()`` is the headline cell (3DFed vs MARS).
"""

import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.config import override
from marsjax.sweep import Sweep


def base():
    c = _setup.mnist()
    c = dataclasses.replace(
        c, name="fmnist_gpu", data=dataclasses.replace(c.data, name="fashion_mnist")
    )
    # The CPU-scale clean start, loaded as the initial global model (its own pretraining config
    # differs in the local-training fields, so it is not this sweep's `pretrain`).
    return override(c, {"run.init_checkpoint": _setup.cpu_pretrain().out_dir})


def get_config():
    return base()


def get_sweep():
    return Sweep(
        name="table2_fmnist_gpu",
        base=base(),
        # MARS first: a GPU session with little time runs the headline column first.
        axes={
            "defense.name": ["mars", *[d for d in _setup.DEFENSES if d != "mars"]],
            "attack.name": ["3dfed", "mra", "cerp"],
        },
        cols="attack.name",
        attack_options=_setup.paper_attack_options("mnist"),
        defense_options=_setup.PAPER_DEFENSE_OPTIONS,
        no_detection=_setup.NO_DETECTION,
        checkpoint_every=5,
        out_dir=str(_setup.RESULTS / "fmnist_gpu" / "table2"),
        description=(
            "Table 2 in the paper's MNIST setting (no reductions) on Fashion-MNIST, from the "
            "CPU-scale clean start (86.2 %)."
        ),
    )
