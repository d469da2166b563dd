"""Table 6: non-IID degree (Dirichlet alpha 0.2 / 0.5 / 0.9 / 10) under 3DFed, 9 defenses, CIFAR-10.

    marsjax sweep experiments/configs/table6_dirichlet.py --set data.data_dir=DIR

Every alpha starts from the same clean model (pretrained at alpha 0.9, as one resumed checkpoint
served the paper's runs).
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.sweep import Sweep

ALPHAS = [0.2, 0.5, 0.9, 10.0]


def get_config():
    return _setup.with_start(_setup.cifar10(), _setup.paper_pretrain("cifar10"))


def get_sweep():
    return Sweep(
        name="table6_dirichlet",
        base=_setup.cifar10(),
        axes={"defense.name": list(_setup.DEFENSES), "data.dirichlet_alpha": ALPHAS},
        cols="data.dirichlet_alpha",
        defense_options=_setup.PAPER_DEFENSE_OPTIONS,
        no_detection=_setup.NO_DETECTION,
        pretrain=_setup.paper_pretrain("cifar10"),
        checkpoint_every=5,
        out_dir=str(_setup.RESULTS / "cifar10" / "table6_dirichlet"),
        description="Table 6: Dirichlet alpha sweep under 3DFed.",
    )
