"""Attacks behind one interface (:class:`Attack`), and their registry.

``REGISTRY`` maps a name to ``build(ctx: AttackContext, **options) -> Attack``; ``options`` come
from ``AttackConfig.options`` and are checked against the signature before anything compiles.
"""

from __future__ import annotations

from marsjax.attacks._badnets import badnets, no_attack
from marsjax.attacks.base import Attack, AttackContext, CraftContext, EmptyState

__all__ = [
    "Attack",
    "AttackContext",
    "CraftContext",
    "EmptyState",
    "REGISTRY",
    "make",
    "badnets",
    "no_attack",
]

REGISTRY = {
    "none": no_attack,
    "badnets": badnets,
}


def make(name: str, ctx: AttackContext, **options) -> Attack:
    """Builds a registered attack."""
    if name not in REGISTRY:
        raise KeyError(f"unknown attack {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](ctx, **options)
