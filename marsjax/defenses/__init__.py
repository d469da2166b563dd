"""Defenses behind one interface (:class:`Defense`), and their registry.

``REGISTRY`` maps a name to ``build(ctx: DefenseContext, **options) -> Defense``; ``options`` come
from ``DefenseConfig.options`` and are checked against the signature before anything compiles.
"""

from __future__ import annotations

from marsjax.defenses import _fedavg
from marsjax.defenses._fedavg import fedavg
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult, EmptyState

__all__ = [
    "Defense",
    "DefenseContext",
    "DefenseResult",
    "EmptyState",
    "REGISTRY",
    "make",
    "fedavg",
]

REGISTRY = {
    "fedavg": _fedavg._build,
}


def make(name: str, ctx: DefenseContext, **options) -> Defense:
    """Builds a registered defense."""
    if name not in REGISTRY:
        raise KeyError(f"unknown defense {name!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[name](ctx, **options)
