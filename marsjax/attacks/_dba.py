"""DBA (Xie, Huang, Chen, Li, "DBA: Distributed Backdoor Attacks against Federated Learning",
ICLR 2020). Re-implemented from the paper; public code was read for facts only.

The global trigger is split into ``num_pieces`` local triggers (4 horizontal bars of ``size``
white pixels, two rows of two, ``gap`` pixels apart, from (``top``, ``left``); the paper's
"trigger size", "trigger gap" and "trigger location"). Each attacker poisons its local training
with its own local trigger only: the attacker with client id ``i`` stamps piece ``i mod
num_pieces`` (a fixed assignment, as DBA assigns local trigger ``i`` to adversary ``i``) on the
first ``poison_fraction`` of every batch, relabelled to the target. At test time the images carry
the whole global trigger (all pieces), the paper's evaluation.

How it maps onto the simulator: ``poison`` cannot tell attackers apart (it sees a batch, not a
client), so ``craft`` retrains each of the round's attackers from the global model on its own
shard (``poison_epochs`` epochs of SGD at ``lr``; both default to the benign clients' values, the
paper's attackers use the benign schedule unless stated) with its own piece, and writes the
update, multiplied by ``scale`` (1; the paper scales by ``γ`` in its single-shot experiments),
into its row. The simulator's own training of the attacker rows is discarded.

On images too small for the bars (8x8 ``digits``), ``size`` shrinks to
``(W - left - gap) // 2``.

This module also holds :func:`train_each_attacker`, the per-attacker training loop shared with
Neurotoxin (:mod:`marsjax.attacks._neurotoxin`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from marsjax.attacks._mra import (
    benign_schedule,
    forward,
    identity_poison,
    make_backdoor_trainer,
    train_each_attacker,
    tree_sub,
)
from marsjax.attacks.base import Attack, AttackContext, CraftContext, EmptyState
from marsjax.client import cross_entropy_loss

__all__ = ["dba", "dba_pieces", "poisoned_ce_loss", "train_each_attacker"]


def dba_pieces(
    image_shape: tuple[int, int, int],
    num_pieces: int = 4,
    size: int = 4,
    gap: int = 2,
    top: int = 0,
    left: int = 0,
) -> np.ndarray:
    """``[num_pieces, H, W, 1]`` bool: the local triggers, row-major in a grid of two columns."""
    h, w = image_shape[0], image_shape[1]
    size = max(1, min(size, (w - left - gap) // 2))
    rows = (num_pieces + 1) // 2
    out = np.zeros((num_pieces, h, w, 1), bool)
    for i in range(num_pieces):
        r = top + (i // 2) * (1 + gap)
        c0 = left + (i % 2) * (size + gap)
        if r >= h or c0 + size > w:
            raise ValueError(
                f"DBA's {num_pieces} pieces of {size} pixels (gap {gap}) at ({top}, {left}) do "
                f"not fit a {h}x{w} image ({rows} rows of bars)"
            )
        out[i, r, c0 : c0 + size, 0] = True
    return out


def poisoned_ce_loss(ctx: AttackContext, stamp: Callable, params_fn: Callable | None = None):
    """``loss_fn`` for ``make_local_train``: CE of the batch whose first ``poison_fraction`` is
    stamped by ``stamp(x, aux)`` and relabelled to the target. ``params_fn(params, aux)`` may
    rewrite the parameters the forward pass sees (masks)."""
    target = ctx.target_label
    frac = ctx.poison_fraction

    def loss_fn(params, batch_stats, x, y, key, aux):
        del key
        k = int(np.floor(frac * x.shape[0]))
        hit = jnp.arange(x.shape[0]) < k
        xs = jnp.where(hit[:, None, None, None], stamp(x, aux), x)
        ys = jnp.where(hit, jnp.asarray(target, y.dtype), y)
        if params_fn is not None:
            params = params_fn(params, aux)
        logits, new_bs = forward(ctx.model, ctx.normalize, params, batch_stats, xs)
        return cross_entropy_loss(logits, ys), new_bs

    return loss_fn


def dba(
    ctx: AttackContext,
    num_pieces: int = 4,
    size: int = 4,
    gap: int = 2,
    top: int = 0,
    left: int = 0,
    lr: float | None = None,
    poison_epochs: int | None = None,
    poison_steps: int | None = None,
    batch_size: int | None = None,
    scale: float = 1.0,
) -> Attack:
    """DBA: each attacker poisons with its own piece of the global trigger; the test uses all.

    Args:
      ctx: static facts of the run.
      num_pieces: local triggers (4).
      size: pixels per bar (4).
      gap: pixels between bars, across and down (2).
      top, left: the first bar's position (0, 0).
      lr: attackers' learning rate (default: the benign ``train.lr``).
      poison_epochs: attackers' epochs (default: the benign ``train.local_epochs``).
      poison_steps: a fixed number of steps instead (tests).
      batch_size: attacker batch size (default: the benign clients').
      scale: multiplies the uploaded updates (1).
    """
    for name, v, lo in (("num_pieces", num_pieces, 1), ("size", size, 1), ("gap", gap, 0)):
        if not (isinstance(v, int) and v >= lo):
            raise ValueError(f"attack.options.{name} must be an integer >= {lo}, got {v}")
    if not (isinstance(top, int) and isinstance(left, int) and top >= 0 and left >= 0):
        raise ValueError(f"attack.options.top/left must be integers >= 0, got {top}, {left}")
    if not scale > 0:
        raise ValueError(f"attack.options.scale must be > 0, got {scale}")
    lr, poison_epochs = benign_schedule(ctx, lr, poison_epochs, poison_steps, "first", batch_size)
    pieces = dba_pieces(ctx.image_shape, num_pieces, size, gap, top, left)
    full = pieces.any(axis=0)
    white = jnp.uint8(255)

    def stamp(x, mask):
        return jnp.where(mask, white.astype(x.dtype), x)

    train_fn = make_backdoor_trainer(
        ctx,
        poisoned_ce_loss(ctx, stamp),
        lr=lr,
        epochs=poison_epochs,
        steps=poison_steps,
        batch_size=batch_size,
    )
    max_slots = max(1, min(ctx.clients_per_round, ctx.num_attackers))
    piece_masks = jnp.asarray(pieces)

    def craft(key, updates, state, c: CraftContext):
        g = c.global_variables

        def one(k, r):
            cid = c.client_ids[r]
            mask = piece_masks[cid % num_pieces]
            trained, _ = train_fn(g, k, c.data, c.data.indices[cid], c.counts[r], mask)
            delta = tree_sub(trained, g)
            return jax.tree.map(lambda d: d * jnp.asarray(scale, d.dtype), delta)

        return train_each_attacker(key, updates, c, max_slots, one), state

    def trigger(x, state):
        return stamp(x, jnp.asarray(full))

    return Attack(lambda v: EmptyState(), identity_poison, craft, trigger)
