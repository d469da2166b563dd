"""Attacks behind one interface (:class:`Attack`), and their registry.

``REGISTRY`` maps a name to ``build(ctx: AttackContext, **options) -> Attack``; ``options`` come
from ``AttackConfig.options`` and are checked against the signature before anything compiles.
"""

from __future__ import annotations

from marsjax.attacks._3dfed import ThreeDFedState, threedfed
from marsjax.attacks._a3fl import A3FLState, a3fl
from marsjax.attacks._adaptive import adaptive_mars
from marsjax.attacks._badnets import badnets, no_attack
from marsjax.attacks._byzantine import ipm, label_flipping, lie, min_max, min_sum
from marsjax.attacks._cerp import CerPState, cerp
from marsjax.attacks._chameleon import chameleon
from marsjax.attacks._dba import dba
from marsjax.attacks._dyn import DynState, dyn
from marsjax.attacks._mra import model_replacement
from marsjax.attacks._neurotoxin import NeurotoxinState, neurotoxin
from marsjax.attacks._partial import partial_layer
from marsjax.attacks._semantic import semantic
from marsjax.attacks.base import Attack, AttackContext, CraftContext, EmptyState

__all__ = [
    "REGISTRY",
    "A3FLState",
    "Attack",
    "AttackContext",
    "CerPState",
    "CraftContext",
    "DynState",
    "EmptyState",
    "NeurotoxinState",
    "ThreeDFedState",
    "a3fl",
    "adaptive_mars",
    "badnets",
    "cerp",
    "chameleon",
    "dba",
    "dyn",
    "ipm",
    "label_flipping",
    "lie",
    "make",
    "min_max",
    "min_sum",
    "model_replacement",
    "neurotoxin",
    "no_attack",
    "partial_layer",
    "semantic",
    "threedfed",
]

REGISTRY = {
    "none": no_attack,
    "badnets": badnets,
    "mra": model_replacement,
    "3dfed": threedfed,
    "cerp": cerp,
    "adaptive": adaptive_mars,
    # Appendix and common FL attacks (issue 14)
    "partial": partial_layer,
    "dba": dba,
    "neurotoxin": neurotoxin,
    "lfa": label_flipping,
    "lie": lie,
    "ipm": ipm,
    "minmax": min_max,
    "minsum": min_sum,
    "dyn": dyn,
    "semantic": semantic,
    "a3fl": a3fl,
    "chameleon": chameleon,
}


def make(name: str, ctx: AttackContext, **options) -> Attack:
    """Builds a registered attack."""
    if name not in REGISTRY:
        raise KeyError(f"unknown attack {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](ctx, **options)
