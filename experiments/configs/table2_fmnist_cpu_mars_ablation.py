"""Why MARS misses some 3DFed uploads at CPU scale: 3DFed with and without its indicators, MARS
with the official clustering (2-means on rows of the W1 matrix) and the paper's (W1 k-means).

    marsjax sweep experiments/configs/table2_fmnist_cpu_mars_ablation.py

3DFed implants its indicators in the last convolution (``conv2`` of SimpleNet), one of the two
layers MARS scores; this ablation switches them off (``use_indicators=False``). The first cell
repeats Table 2's 3DFed x MARS cell (same config, so the same numbers).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.sweep import Sweep


def get_config():
    return _setup.with_start(_setup.fmnist_cpu(), _setup.cpu_pretrain())


def get_sweep():
    a = _setup.cpu_attack_options()["3dfed"]
    d = _setup.cpu_defense_options()["mars"]
    return Sweep(
        name="table2_fmnist_cpu_mars_ablation",
        base=_setup.fmnist_cpu(),
        axes={
            "mars": {
                "official": {"defense.name": "mars", "defense.options": d},
                "paper-kmeans": {
                    "defense.name": "mars",
                    "defense.options": {**d, "clustering": "paper"},
                },
            },
            "attack": {
                "3dfed": {"attack.name": "3dfed", "attack.options": a},
                "3dfed-no-indicators": {
                    "attack.name": "3dfed",
                    "attack.options": {**a, "use_indicators": False},
                },
            },
        },
        cols="attack",
        pretrain=_setup.cpu_pretrain(),
        out_dir=str(_setup.RESULTS / "fmnist_cpu" / "table2_mars_ablation"),
        description="MARS vs 3DFed at CPU scale: indicators and the clustering rule.",
    )
