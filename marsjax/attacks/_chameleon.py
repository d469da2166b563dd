"""Chameleon (Dai & Li, "Chameleon: Adapting to Peer Images for Planting Durable Backdoors in
Federated Learning", ICML 2023, arXiv:2304.12961; the MARS paper's Table 15). Re-implemented from
the paper; no code is copied.

Chameleon's observation: how long a backdoor survives depends on the poisoned images' *peers*,
benign images of the target class (facilitating peers) and of the poisoned images' original
classes (obstructive peers). It therefore shapes the attacker's feature space with supervised
contrastive learning so that poisoned images cluster with the target class and away from their
original class, and only then fits the classifier. Per attack round, one model for all the
round's attackers, trained from ``θ_G`` on the first sampled attacker's shard (``data="first"``)
or all sampled attackers' shards (``"pooled"``):

1. **Contrastive stage** (``contrastive_epochs`` at ``lr``): every batch of ``B`` clean images is
   extended by stamped copies of its first ``floor(poison_fraction B)`` images (pattern trigger),
   labelled with the target. The encoder (every layer before the last dense layer; its output,
   the last dense layer's input, L2-normalised, is the representation) minimises the supervised
   contrastive loss (Khosla et al. 2020) with temperature ``temperature``: for each anchor, the
   samples with its label are positives, the others negatives; in the denominator of a *poisoned*
   anchor its obstructive peers (clean images of its original class) count ``obstructive_weight``
   times, so that they are pushed away harder. The classifier head is frozen.
2. **Classifier stage** (``head_epochs`` at ``lr``): the encoder is frozen (BatchNorm in inference
   mode) and the last dense layer is trained with cross-entropy on batches whose first
   ``poison_fraction`` is stamped and relabelled.
3. The update ``θ - θ_G`` times ``scale`` (1) is every attacker's upload; ASR with the pattern
   trigger.

Simplifications (a compact version of the paper's method): no projection head (the contrastive
loss acts on the encoder's output directly); one shared model for the round's attackers (as
marsjax's MRA) instead of one per attacker; the frozen parts are frozen in the gradient (the
SGD weight decay of ``train.weight_decay`` still shrinks them slightly); the paper's
separate learning rates and epochs per stage become ``lr`` and the two epoch counts; the
obstructive-peer weighting is one scalar.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from marsjax.attacks._3dfed import find_layers
from marsjax.attacks._mra import (
    check_common,
    forward,
    identity_poison,
    make_backdoor_trainer,
    pattern_trigger_fn,
    train_shared_backdoor,
    write_rows,
)
from marsjax.attacks.base import Attack, AttackContext, CraftContext, EmptyState
from marsjax.client import cross_entropy_loss
from marsjax.data.triggers import apply_trigger, poison_batch

__all__ = ["chameleon", "supcon_loss"]


def supcon_loss(
    z: jax.Array,
    labels: jax.Array,
    temperature: float,
    obstructive: jax.Array | None = None,
    obstructive_weight: float = 1.0,
) -> jax.Array:
    """Supervised contrastive loss of the rows of ``z`` ``[n, d]`` (L2-normalised inside).

    ``obstructive`` ``[n, n]`` bool marks, per anchor row, the samples whose term in the
    denominator counts ``obstructive_weight`` times. Anchors without a positive are left out.
    """
    n = z.shape[0]
    zn = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    sim = zn @ zn.T / temperature
    eye = jnp.eye(n, dtype=bool)
    sim = sim - jax.lax.stop_gradient(jnp.max(jnp.where(eye, -1e9, sim), axis=1, keepdims=True))
    w = jnp.ones((n, n), sim.dtype)
    if obstructive is not None:
        w = jnp.where(obstructive, obstructive_weight, 1.0)
    denom = jnp.log(jnp.sum(jnp.where(eye, 0.0, w * jnp.exp(sim)), axis=1))
    pos = (labels[:, None] == labels[None, :]) & ~eye
    npos = jnp.sum(pos, axis=1)
    log_prob = jnp.where(pos, sim - denom[:, None], 0.0)
    per_anchor = -jnp.sum(log_prob, axis=1) / jnp.maximum(npos, 1)
    has = npos > 0
    return jnp.sum(jnp.where(has, per_anchor, 0.0)) / jnp.maximum(jnp.sum(has), 1)


def chameleon(
    ctx: AttackContext,
    contrastive_epochs: int = 5,
    head_epochs: int = 2,
    temperature: float = 0.5,
    obstructive_weight: float = 2.0,
    lr: float = 0.055,
    poison_steps: int | None = None,
    batch_size: int | None = None,
    data: str = "first",
    scale: float = 1.0,
) -> Attack:
    """Chameleon: contrastive shaping of the encoder, then the classifier head.

    Args:
      ctx: static facts of the run.
      contrastive_epochs: epochs of the contrastive (encoder) stage (5).
      head_epochs: epochs of the classifier-head stage (2).
      temperature: the contrastive loss's temperature (0.5).
      obstructive_weight: weight of a poisoned anchor's original-class peers in the
        denominator (2; 1 is plain supervised contrastive learning).
      lr: SGD learning rate of both stages (0.055, the MARS code's attacker rate).
      poison_steps: a fixed number of steps per stage instead of epochs (tests).
      batch_size: attacker batch size (default: the benign clients').
      data: ``"first"`` or ``"pooled"`` (:func:`marsjax.attacks._mra.attacker_data`).
      scale: multiplies the uploads (1).
    """
    check_common(lr, contrastive_epochs, poison_steps, data, batch_size)
    if not (isinstance(head_epochs, int) and head_epochs >= 1):
        raise ValueError(f"attack.options.head_epochs must be an integer >= 1, got {head_epochs}")
    if not temperature > 0 or not obstructive_weight > 0 or not scale > 0:
        raise ValueError("attack.options.temperature, obstructive_weight and scale must be > 0")

    x0 = jax.ShapeDtypeStruct((1, *ctx.image_shape), jnp.float32)
    shapes = jax.eval_shape(ctx.model.init, jax.random.key(0), x0)["params"]
    head = find_layers(shapes)["output"][:-1]  # the last dense layer's module path
    head_name = head[-1]
    target = ctx.target_label
    frac = ctx.poison_fraction

    def is_head(path) -> bool:
        names = tuple(str(getattr(k, "key", k)) for k in path)
        return names[: len(head)] == head

    def freeze(params, head_trainable: bool):
        def f(path, p):
            keep = is_head(path) == head_trainable
            return p if keep else jax.lax.stop_gradient(p)

        return jax.tree_util.tree_map_with_path(f, params)

    def features(params, batch_stats, x, train: bool):
        store = {}

        def grab(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and context.module.name == head_name:
                store.setdefault("z", args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(grab):
            _, new_bs = forward(ctx.model, ctx.normalize, params, batch_stats, x, train)
        return store["z"], new_bs

    def contrastive_loss(params, batch_stats, x, y, key, aux):
        del key, aux
        k = int(np.floor(frac * x.shape[0]))
        xs = jnp.concatenate([x, apply_trigger(x[:k], ctx.trigger)])
        labels = jnp.concatenate([y, jnp.full((k,), target, y.dtype)])
        orig = jnp.concatenate([y, y[:k]])
        poisoned = jnp.arange(xs.shape[0]) >= x.shape[0]
        # Per poisoned anchor: the clean samples of its original class (its obstructive peers).
        obstructive = poisoned[:, None] & ~poisoned[None, :] & (orig[:, None] == orig[None, :])
        z, new_bs = features(freeze(params, False), batch_stats, xs, True)
        return supcon_loss(z, labels, temperature, obstructive, obstructive_weight), new_bs

    def head_loss(params, batch_stats, x, y, key, aux):
        del key, aux
        px, py = poison_batch(x, y, ctx.trigger, target, frac)
        logits, _ = forward(ctx.model, ctx.normalize, freeze(params, True), batch_stats, px, False)
        return cross_entropy_loss(logits, py), batch_stats

    train_enc = make_backdoor_trainer(
        ctx,
        contrastive_loss,
        lr=lr,
        epochs=contrastive_epochs,
        steps=poison_steps,
        batch_size=batch_size,
    )
    train_head = make_backdoor_trainer(
        ctx, head_loss, lr=lr, epochs=head_epochs, steps=poison_steps, batch_size=batch_size
    )

    def craft(key, updates, state, c: CraftContext):
        k1, k2 = jax.random.split(key)
        g = c.global_variables
        delta1, _ = train_shared_backdoor(ctx, train_enc, k1, c, data)
        stage1 = jax.tree.map(lambda a, d: a + d, g, delta1)
        c1 = c._replace(global_variables=stage1)
        delta2, _ = train_shared_backdoor(ctx, train_head, k2, c1, data)
        delta = jax.tree.map(lambda a, b: (a + b) * jnp.asarray(scale, a.dtype), delta1, delta2)
        return write_rows(updates, c.is_malicious, delta), state

    return Attack(lambda v: EmptyState(), identity_poison, craft, pattern_trigger_fn(ctx))
