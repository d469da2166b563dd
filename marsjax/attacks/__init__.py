"""Attacks behind one interface (:class:`Attack`), and their registry.

``REGISTRY`` maps a name to ``build(ctx: AttackContext, **options) -> Attack``; ``options`` come
from ``AttackConfig.options`` and are checked against the signature before anything compiles.
"""

from __future__ import annotations

from marsjax.attacks._3dfed import ThreeDFedState, threedfed
from marsjax.attacks._adaptive import adaptive_mars
from marsjax.attacks._badnets import badnets, no_attack
from marsjax.attacks._cerp import CerPState, cerp
from marsjax.attacks._mra import model_replacement
from marsjax.attacks.base import Attack, AttackContext, CraftContext, EmptyState

__all__ = [
    "REGISTRY",
    "Attack",
    "AttackContext",
    "CerPState",
    "CraftContext",
    "EmptyState",
    "ThreeDFedState",
    "adaptive_mars",
    "badnets",
    "cerp",
    "make",
    "model_replacement",
    "no_attack",
    "threedfed",
]

REGISTRY = {
    "none": no_attack,
    "badnets": badnets,
    "mra": model_replacement,
    "3dfed": threedfed,
    "cerp": cerp,
    "adaptive": adaptive_mars,
}


def make(name: str, ctx: AttackContext, **options) -> Attack:
    """Builds a registered attack."""
    if name not in REGISTRY:
        raise KeyError(f"unknown attack {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](ctx, **options)
