"""Table 2 (cifar10): MRA / CerP / 3DFed x the paper's 9 defenses, full scale (needs a GPU and the
dataset: ``--set data.data_dir=DIR``).

    marsjax sweep experiments/configs/table2_cifar10.py --set data.data_dir=DIR

Pretrains the clean start first (``pretrain_cifar10.py``) when it is missing; every run checkpoints
every 5 rounds, so an interrupted sweep resumes. ``get_config()`` is the headline cell (3DFed vs
MARS) for ``marsjax run`` / ``marsjax validate``.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.sweep import Sweep


def get_config():
    return _setup.with_start(_setup.cifar10(), _setup.paper_pretrain("cifar10"))


def get_sweep():
    return Sweep(
        name="table2_cifar10",
        base=_setup.cifar10(),
        axes={"defense.name": list(_setup.DEFENSES), "attack.name": list(_setup.ATTACKS)},
        cols="attack.name",
        attack_options=_setup.paper_attack_options("cifar10"),
        defense_options=_setup.PAPER_DEFENSE_OPTIONS,
        no_detection=_setup.NO_DETECTION,
        pretrain=_setup.paper_pretrain("cifar10"),
        checkpoint_every=5,
        out_dir=str(_setup.RESULTS / "cifar10" / "table2"),
        description="Table 2 (cifar10), the paper's setting (mars_spec §2, §3.1).",
    )
