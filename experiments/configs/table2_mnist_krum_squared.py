"""Ablation of the MNIST Table 2 (see ``table2_mnist_ablations.py``): Multi-Krum with the Krum papers' squared distances over the parameters (``distance="squared"``,
``layers="params"``, marsjax's default) instead of the MARS code's unsquared distances over every
entry, in the ``mnist_paper`` setting.

    marsjax sweep experiments/configs/table2_mnist_krum_squared.py
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.config import override
from marsjax.sweep import Sweep


def get_config():
    return override(
        _setup.mnist_paper(defense="multikrum", attack="3dfed"),
        {"defense.options": {"distance": "squared", "layers": "params"}},
    )


def get_sweep():
    return Sweep(
        name="table2_mnist_krum_squared",
        base=override(_setup.mnist_paper(), {"run.eval_every": 5}),
        axes={"defense.name": ["multikrum"], "attack.name": list(_setup.ATTACKS)},
        seeds=(0,),
        cols="attack.name",
        attack_options=_setup.MNIST_ATTACK_OPTIONS,
        defense_options={
            **_setup.OFFICIAL_DEFENSE_OPTIONS,
            "multikrum": {"distance": "squared", "layers": "params"},
        },
        no_detection=_setup.NO_DETECTION,
        checkpoint_every=5,
        out_dir=str(_setup.RESULTS / "mnist_paper" / "krum_squared"),
        description="Ablation of the mnist_paper Table 2: krum_squared (see the config's docstring).",
    )
