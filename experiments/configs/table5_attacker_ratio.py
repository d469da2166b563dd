"""Table 5: MARS under 3DFed for attacker ratios 0-95% (CIFAR-10; mars_spec §3.4, §6.16).

    marsjax sweep experiments/configs/table5_attacker_ratio.py --set data.data_dir=DIR

A ratio r% makes r of the 100 clients attackers and samples r% of each round's 20 clients from
them (0%: no attack).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.sweep import Sweep

RATIOS = [0, 10, 20, 30, 50, 70, 95]


def _ratio(r: int) -> dict:
    if r == 0:
        return {
            "attack.name": "none",
            "attack.options": {},
            "attack.num_attackers": 0,
            "attack.attackers_per_round": 0,
        }
    return {"attack.num_attackers": r, "attack.attackers_per_round": 20 * r // 100}


def get_config():
    return _setup.with_start(_setup.cifar10(), _setup.paper_pretrain("cifar10"))


def get_sweep():
    return Sweep(
        name="table5_attacker_ratio",
        base=_setup.cifar10(),
        axes={"ratio": {str(r): _ratio(r) for r in RATIOS}, "defense.name": ["mars"]},
        cols="ratio",
        defense_options=_setup.PAPER_DEFENSE_OPTIONS,
        pretrain=_setup.paper_pretrain("cifar10"),
        checkpoint_every=5,
        out_dir=str(_setup.RESULTS / "cifar10" / "table5_attacker_ratio"),
        description="Table 5: MARS vs 3DFed, attacker ratio (% of clients, and of each round).",
    )
