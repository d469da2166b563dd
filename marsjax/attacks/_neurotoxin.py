"""Neurotoxin (Zhang, Panda, Song, Yang, Mahoney, Gonzalez, Ramchandran, Mittal, "Neurotoxin:
Durable Backdoors in Federated Learning", ICML 2022). Re-implemented from the paper; public code
was read for facts only.

The backdoor is written into the coordinates that benign clients rarely change, so that benign
training does not wash it out. Per attack round, for every attacker:

1. the benign update is approximated (``reference``): by the global model's change over the last
   round, ``θ_G(t) - θ_G(t-1)`` (``"global"``, the paper's attacker, which sees only the global
   models), or by the mean of this round's benign updates (``"benign"``, an omniscient attacker);
   in the first attack round, with no earlier global model kept, ``"global"`` uses the benign
   mean;
2. the mask keeps the ``mask_ratio`` share of the parameter coordinates (over all parameter
   tensors together) whose reference magnitude is smallest, i.e. it excludes the top-``k`` % with
   ``k = 100 (1 - mask_ratio)`` (the official code's ``gradmask_ratio``, e.g. 0.95);
3. the attacker trains from the global model on its own shard with the pattern trigger on the
   first ``poison_fraction`` of every batch (relabelled to the target), its gradient projected
   onto the mask at every step (masked-out coordinates stay at the global values, so their
   gradient is zero), for ``poison_epochs`` epochs at ``lr`` (default: the benign schedule);
4. the upload is the trained model minus the global model, exactly 0 outside the mask on the
   parameters (BatchNorm running statistics are not gradient-trained and are uploaded as
   trained), optionally projected onto the L2 ball of radius ``norm_bound`` (the paper's
   attacker stays inside the defense's norm bound; here once at the end instead of every step),
   times ``scale``.

The state keeps the parameters of the last attack round's global model (``reference="global"``).
When the attack skips rounds (``attack.start_round`` > 0 or a ``stop_round``), the "last round"
is the last attack round.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from marsjax.attacks._byzantine import benign_stats
from marsjax.attacks._dba import poisoned_ce_loss, train_each_attacker
from marsjax.attacks._mra import (
    benign_schedule,
    identity_poison,
    make_backdoor_trainer,
    pattern_trigger_fn,
    tree_sub,
)
from marsjax.attacks.base import Attack, AttackContext, CraftContext
from marsjax.data.triggers import apply_trigger

__all__ = ["REFERENCES", "NeurotoxinState", "neurotoxin", "neurotoxin_mask"]

REFERENCES = ("global", "benign")


class NeurotoxinState(NamedTuple):
    """Neurotoxin's state.

    Attributes:
      prev_params: the global model's parameters at the last attack round.
      attack_rounds: int32, attack rounds so far.
    """

    prev_params: dict
    attack_rounds: jax.Array


def neurotoxin_mask(reference, mask_ratio: float):
    """A bool tree like ``reference``: True on the ``floor(mask_ratio * D)`` coordinates of
    smallest ``|reference|`` over all leaves together (ties broken by position)."""
    leaves, treedef = jax.tree.flatten(reference)
    flat = jnp.concatenate([jnp.abs(x).reshape(-1).astype(jnp.float32) for x in leaves])
    d = flat.shape[0]
    keep = int(mask_ratio * d)
    order = jnp.argsort(flat, stable=True)
    mask = jnp.zeros((d,), bool).at[order[:keep]].set(True)
    out, i = [], 0
    for x in leaves:
        out.append(mask[i : i + x.size].reshape(x.shape))
        i += x.size
    return jax.tree.unflatten(treedef, out)


def neurotoxin(
    ctx: AttackContext,
    mask_ratio: float = 0.95,
    reference: str = "global",
    norm_bound: float | None = None,
    lr: float | None = None,
    poison_epochs: int | None = None,
    poison_steps: int | None = None,
    batch_size: int | None = None,
    scale: float = 1.0,
) -> Attack:
    """Neurotoxin: backdoor training projected onto the benign updates' smallest coordinates.

    Args:
      ctx: static facts of the run.
      mask_ratio: share of the parameter coordinates the backdoor may change (0.95: the top 5 %
        of the benign reference are excluded).
      reference: ``"global"`` (last round's global update, the paper) or ``"benign"`` (this
        round's benign mean).
      norm_bound: clip each upload's parameter update to this L2 norm (``None``: no clipping).
      lr: attackers' learning rate (default: the benign ``train.lr``).
      poison_epochs: attackers' epochs (default: the benign ``train.local_epochs``).
      poison_steps: a fixed number of steps instead (tests).
      batch_size: attacker batch size (default: the benign clients').
      scale: multiplies the uploads (1).
    """
    if not 0.0 < mask_ratio <= 1.0:
        raise ValueError(f"attack.options.mask_ratio must be in (0, 1], got {mask_ratio}")
    if reference not in REFERENCES:
        raise ValueError(f"attack.options.reference must be one of {REFERENCES}, got {reference!r}")
    if norm_bound is not None and not norm_bound > 0:
        raise ValueError(f"attack.options.norm_bound must be None or > 0, got {norm_bound}")
    if not scale > 0:
        raise ValueError(f"attack.options.scale must be > 0, got {scale}")
    lr, poison_epochs = benign_schedule(ctx, lr, poison_epochs, poison_steps, "first", batch_size)

    def stamp(x, aux):
        return apply_trigger(x, ctx.trigger)

    def masked(params, aux):
        mask, g_params = aux
        return jax.tree.map(
            lambda p, m, g: jnp.where(m, p, jax.lax.stop_gradient(g.astype(p.dtype))),
            params,
            mask,
            g_params,
        )

    train_fn = make_backdoor_trainer(
        ctx,
        poisoned_ce_loss(ctx, stamp, masked),
        lr=lr,
        epochs=poison_epochs,
        steps=poison_steps,
        batch_size=batch_size,
    )
    max_slots = max(1, min(ctx.clients_per_round, ctx.num_attackers))

    def init(global_variables) -> NeurotoxinState:
        # A copy: the round donates the state, which must not share buffers with the model.
        params = dict(global_variables)["params"]
        return NeurotoxinState(
            jax.tree.map(lambda x: jnp.array(x, copy=True), params), jnp.int32(0)
        )

    def craft(key, updates, state: NeurotoxinState, c: CraftContext):
        g = c.global_variables
        benign_mean, _ = benign_stats(updates["params"], ~c.is_malicious)
        if reference == "global":
            prev = tree_sub(g["params"], state.prev_params)
            ref = jax.tree.map(
                lambda a, b: jnp.where(state.attack_rounds > 0, a, b), prev, benign_mean
            )
        else:
            ref = benign_mean
        mask = neurotoxin_mask(ref, mask_ratio)

        def one(k, r):
            cid = c.client_ids[r]
            trained, _ = train_fn(
                g, k, c.data, c.data.indices[cid], c.counts[r], (mask, g["params"])
            )
            delta = tree_sub(trained, g)
            dp = jax.tree.map(
                lambda d, m: jnp.where(m, d, 0.0).astype(d.dtype), delta["params"], mask
            )
            if norm_bound is not None:
                n = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(dp)))
                f = jnp.minimum(1.0, norm_bound / jnp.maximum(n, 1e-12))
                dp = jax.tree.map(lambda x: x * f.astype(x.dtype), dp)
            delta = {**delta, "params": dp}
            return jax.tree.map(lambda d: d * jnp.asarray(scale, d.dtype), delta)

        out = train_each_attacker(key, updates, c, max_slots, one)
        return out, NeurotoxinState(g["params"], state.attack_rounds + 1)

    return Attack(init, identity_poison, craft, pattern_trigger_fn(ctx))
