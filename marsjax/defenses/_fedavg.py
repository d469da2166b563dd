"""FedAvg (McMahan et al. 2017, arXiv:1602.05629): accept everyone, weighted mean of the updates."""

from __future__ import annotations

import jax.numpy as jnp

from marsjax.defenses.base import Defense, DefenseContext, DefenseResult, EmptyState
from marsjax.tree import weighted_mean

__all__ = ["fedavg"]


def fedavg() -> Defense:
    """No defense: every client with a non-zero weight is accepted."""

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del key, global_variables, client_ids
        accepted = (client_weights > 0).astype(jnp.float32)
        update = weighted_mean(updates, client_weights)
        return DefenseResult(update, accepted, jnp.zeros_like(accepted)), state

    return Defense(lambda v: EmptyState(), apply)


def _build(ctx: DefenseContext) -> Defense:
    return fedavg()
