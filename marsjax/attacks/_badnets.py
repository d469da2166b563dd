"""Pixel-pattern backdoor by poisoned local training (BadNets, Gu et al. 2017, arXiv:1708.06733).

Every attacker trains on its own shard with the paper's 5x3 pattern stamped on the first
``poison_fraction`` of each batch, relabelled to the target (the official code's data poisoning).
``scale`` multiplies the malicious updates afterwards (boosting, as model replacement does;
1 = plain data poisoning). ``none`` is the same machinery with no poisoning, so that ASR is still
measured with the pattern on clean models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marsjax.attacks.base import Attack, AttackContext, CraftContext, EmptyState
from marsjax.data.triggers import apply_trigger, poison_batch

__all__ = ["badnets", "no_attack"]


def _stamp(trigger):
    return lambda x, state: apply_trigger(x, trigger)


def no_attack(ctx: AttackContext) -> Attack:
    """No attack: attackers behave like everyone else."""
    return Attack(
        init=lambda v: EmptyState(),
        poison=lambda key, x, y, state: (x, y),
        craft=lambda key, updates, state, c: (updates, state),
        trigger=_stamp(ctx.trigger),
    )


def badnets(ctx: AttackContext, scale: float = 1.0) -> Attack:
    """Poisoned local training with the pattern trigger, malicious updates scaled by ``scale``."""
    if not scale > 0:
        raise ValueError(f"attack.options.scale must be > 0, got {scale}")

    def poison(key, x, y, state):
        return poison_batch(x, y, ctx.trigger, ctx.target_label, ctx.poison_fraction)

    def craft(key, updates, state, c: CraftContext):
        m = c.is_malicious

        def f(u):
            s = jnp.where(m, jnp.asarray(scale, u.dtype), jnp.asarray(1.0, u.dtype))
            return u * s.reshape((-1,) + (1,) * (u.ndim - 1))

        return jax.tree.map(f, updates), state

    return Attack(lambda v: EmptyState(), poison, craft, _stamp(ctx.trigger))
