"""Table 3: the adaptive attack on MARS (CE + lambda * backdoor energy), MARS vs MARS*, CIFAR-10.

marsjax sweep experiments/configs/table3_adaptive.py --set data.data_dir=DIR
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.config import override
from marsjax.sweep import Sweep

LAMBDAS = [1e-4, 1e-3, 0.01, 0.05, 0.1]


def get_config():
    cfg = override(_setup.cifar10(), {"attack.name": "adaptive", "attack.options": {"lam": 0.05}})
    return _setup.with_start(cfg, _setup.paper_pretrain("cifar10"))


def get_sweep():
    base = override(_setup.cifar10(), {"attack.name": "adaptive", "attack.options": {}})
    return Sweep(
        name="table3_adaptive",
        base=base,
        axes={"attack.options.lam": LAMBDAS, "defense.name": ["mars", "mars_star"]},
        cols="defense.name",
        defense_options=_setup.PAPER_DEFENSE_OPTIONS,
        pretrain=_setup.paper_pretrain("cifar10"),
        checkpoint_every=5,
        out_dir=str(_setup.RESULTS / "cifar10" / "table3_adaptive"),
        description="Table 3: adaptive attack (paper form, lambda sweep) vs MARS and MARS*.",
    )
