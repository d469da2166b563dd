"""Shared pieces of the appendix sweeps (the MARS paper's Tables 7 and 13-19, mars_spec §3.5) on
real MNIST in the official setting (the ``mnist_official`` preset, :func:`_setup.mnist_official`).

The sweep machinery runs every point of a grid with the same seeds, so these sweeps run the main
defenses only, each with 3 seeds (mean ± std in the tables): MARS, FedAvg, Multi-Krum and FLAME,
and MARS with every layer scored (``layers="all"``, the paper's "MARS (all layers)") where the
paper has it (Table 17). The other defenses of Table 2 can be run on one seed with
``marsjax sweep FILE`` on a copy whose ``DEFENSE_AXIS`` lists them and ``seeds=(0,)``.
"""

from __future__ import annotations

import _setup

from marsjax.config import ExperimentConfig, override
from marsjax.sweep import Sweep

# The defenses of the appendix sweeps, as a mapping axis (label -> changes).
DEFENSE_AXIS = {
    "mars": {"defense.name": "mars"},
    "fedavg": {"defense.name": "fedavg"},
    "multikrum": {"defense.name": "multikrum"},
    "flame": {"defense.name": "flame"},
}
MARS_ALL_LAYERS = {"mars_all": {"defense.name": "mars", "defense.options.layers": "all"}}

# The appendix attacks' options on MNIST (Dyn-Attack's candidates as in Table 2's sweep).
ATTACK_OPTIONS = {
    **_setup.MNIST_ATTACK_OPTIONS,
    "dyn": {"threedfed_options": {"constants": "mnist"}, "mra_options": {"scale": 5.0}},
}


def base(**changes) -> ExperimentConfig:
    """The official MNIST setting, ACC/ASR every 5 rounds and after the last."""
    return override(_setup.mnist_official(), {"run.eval_every": 5, **changes})


def sweep(
    name: str,
    attacks: dict,
    description: str,
    *,
    defenses: dict | None = None,
    rounds: int | None = None,
) -> Sweep:
    """One appendix sweep: ``attacks`` is the attack axis (label -> changes)."""
    changes = {} if rounds is None else {"run.rounds": rounds}
    return Sweep(
        name=name,
        base=base(**changes),
        axes={"defense": defenses or DEFENSE_AXIS, "attack": attacks},
        seeds=_setup.SEEDS,
        cols="attack",
        attack_options=ATTACK_OPTIONS,
        defense_options=_setup.OFFICIAL_DEFENSE_OPTIONS,
        no_detection=_setup.NO_DETECTION,
        checkpoint_every=5,
        out_dir=str(_setup.RESULTS / "mnist_official" / name),
        description=description,
    )
