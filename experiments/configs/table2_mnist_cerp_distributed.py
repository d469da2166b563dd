"""Ablation of the MNIST Table 2 (see ``table2_mnist_ablations.py``): CerP with each attacker training on its own 6-pixel piece of the trigger (``variant="distributed"``,
marsjax's earlier default) instead of the official code's full trigger, in the ``mnist_paper``
setting.

    marsjax sweep experiments/configs/table2_mnist_cerp_distributed.py
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.config import override
from marsjax.sweep import Sweep


def get_config():
    return override(
        _setup.mnist_paper(defense="mars", attack="cerp"),
        {"attack.options": {"variant": "distributed"}},
    )


def get_sweep():
    return Sweep(
        name="table2_mnist_cerp_distributed",
        base=override(_setup.mnist_paper(), {"run.eval_every": 5}),
        axes={"defense.name": list(_setup.DEFENSES), "attack.name": ["cerp"]},
        seeds=(0,),
        cols="attack.name",
        attack_options={**_setup.MNIST_ATTACK_OPTIONS, "cerp": {"variant": "distributed"}},
        defense_options=_setup.OFFICIAL_DEFENSE_OPTIONS,
        no_detection=_setup.NO_DETECTION,
        checkpoint_every=5,
        out_dir=str(_setup.RESULTS / "mnist_paper" / "cerp_distributed"),
        description="Ablation of the mnist_paper Table 2: cerp_distributed (see the config's docstring).",
    )
