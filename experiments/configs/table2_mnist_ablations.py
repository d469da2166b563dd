"""Ablations of the MNIST Table 2 settings: one change at a time, to measure the cause of a
difference between our tables and the paper's (``experiments/README.md`` says which ran).

    marsjax sweep experiments/configs/table2_mnist_ablations.py --only variant=paper_bn \\
        --only defense.name=mars,multikrum --only attack.name=3dfed

The base is the ``mnist_paper`` setting (``table2_mnist_paper.py``, same baseline options); each
``variant`` changes one thing:

* ``paper_bn``: the SimpleNet with BatchNorm after each convolution (MARS then folds the BN gains
  into the channel energies; 3DFed's indicator entries are no longer tiny, see
  ``marsjax/attacks/_3dfed.py``).
* ``official_bn``: the same change in the ``mnist_official`` federation (20 clients, all every
  round).
* ``paper_mean_rule``: the server adds the mean accepted update (``server_rule="mean"``, step 1)
  instead of the official ``1/100 * sum``.

Changes of one attack's or defense's options are sweeps of their own:
``table2_mnist_cerp_distributed.py`` (CerP's earlier distributed-trigger variant) and
``table2_mnist_krum_squared.py`` (Multi-Krum with the Krum papers' distances).

Only meaningful combinations are run (``--only``); the grid lists them all.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _setup

from marsjax.config import override
from marsjax.sweep import Sweep

_OFFICIAL_FEDERATION = {
    "data.num_clients": 20,
    "attack.num_attackers": 4,
    "attack.attackers_per_round": 4,
}


def get_config():
    return override(_setup.mnist_paper(), {"model.batch_norm": True})


def get_sweep():
    return Sweep(
        name="table2_mnist_ablations",
        base=override(_setup.mnist_paper(), {"run.eval_every": 5}),
        axes={
            "variant": {
                "paper_bn": {"model.batch_norm": True},
                "official_bn": {**_OFFICIAL_FEDERATION, "model.batch_norm": True},
                "paper_mean_rule": {"run.server_rule": "mean", "run.server_lr": 1.0},
            },
            "defense.name": list(_setup.DEFENSES),
            "attack.name": list(_setup.ATTACKS),
        },
        seeds=(0,),
        cols="attack.name",
        attack_options=_setup.MNIST_ATTACK_OPTIONS,
        defense_options=_setup.OFFICIAL_DEFENSE_OPTIONS,
        no_detection=_setup.NO_DETECTION,
        checkpoint_every=5,
        out_dir=str(_setup.RESULTS / "mnist_paper" / "ablations"),
        description="Ablations of the MNIST settings, one change at a time (see the config).",
    )
