"""Model replacement attack (MRA; Bagdasaryan et al., "How To Backdoor Federated Learning",
AISTATS 2020, arXiv:1807.00459), as the MARS paper runs it (arXiv:2509.20383, mars_spec §2.3).

One backdoored model is trained from the current global model ``θ_G`` with the "blind" loss::

    0.3 * CE(clean batch) + 0.3 * CE(batch with its first ``poison_fraction`` stamped and
    relabelled to the target) + 0.4 * ||θ - θ_G||_2

(the L2 norm over all trainable parameters, not squared), for ``poison_epochs`` epochs of SGD with
``lr`` (MARS: 0.055, momentum 0.9, weight decay 5e-4). Its update is multiplied by ``scale``
(``fl_weight_scale`` = 5) and uploaded by every attacker of the round (identical rows).
``uploads="own"`` instead trains one model per attacker, each on its own shard from ``θ_G`` with
its own key (distinct rows; an ablation: identical rows give each attacker zero distance to the
others, which matters to distance-based defenses such as Multi-Krum).

This module also holds the pieces that MRA shares with CerP, 3DFed and the adaptive attack:
choosing the attackers' training data (:func:`attacker_data`), the blind loss
(:func:`make_blind_loss`), a forward pass that handles BatchNorm (:func:`forward`) and row
writers for stacked updates.

Differences from the official code ([3D]/[C] ``attacks/modelreplace.py``):

* The official attacker client 0 trains (on its own loader) only when sampled, and a stale
  update is reused otherwise; here every round's sampled attackers share one model trained from
  the current global model (mars_spec §6.12). Its data is the shard of the sampled attacker with
  the smallest client id (``data="first"``, closest to "attacker 0"), or the union of all sampled
  attackers' shards (``data="pooled"``).
* The update includes the BatchNorm running statistics and is scaled as a whole, as the official
  ``scale_update`` scales every state-dict entry.
* The data-level ``poison`` is the identity: the simulator's local training of the attacker rows
  is discarded (rows are overwritten) and so need not be poisoned.

The two official repositories differ in the third loss term. The MARS repository's
``ModelReplace`` adds ``eu_constraint``, the Euclidean distance above, whose gradient pulls the
model back towards ``θ_G``: the default here (``loss_weights=(0.3, 0.3, 0.4)``). The 3DFed
repository's adds ``cs_constraint``, ``1e3 · (1 − cos(s (θ − θ_G) + θ_G, θ_G))`` with ``s`` the
``fl_weight_scale``, computed on flattened copies of the weights taken through ``.data``: a
constant to autograd, so its attacker trains on ``0.3 · CE(clean) + 0.3 · CE(poisoned)`` alone.
``loss_weights=(0.3, 0.3, 0.0)`` is that training. It matters: in the official MNIST federation (seed 0, 10 rounds, commit 1372062,
``experiments/results/mnist_official/ablations/*_mra_3dfed_repo_loss``) Multi-Krum and FLAME catch
every MRA upload from round 2 on, as the MARS paper reports for MRA, where with the distance term
they catch none in 30 rounds; see ``experiments/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from marsjax.attacks.base import Attack, AttackContext, CraftContext, EmptyState
from marsjax.client import cross_entropy_loss, make_local_train
from marsjax.data.triggers import apply_trigger, poison_batch
from marsjax.types import Variables

__all__ = [
    "DATA_MODES",
    "UPLOAD_MODES",
    "attacker_data",
    "attacker_ranks",
    "forward",
    "make_backdoor_trainer",
    "make_blind_loss",
    "model_replacement",
    "params_norm",
    "safe_norm",
    "safe_sqrt",
    "tree_sub",
    "write_rows",
]

DATA_MODES = ("first", "pooled")
UPLOAD_MODES = ("shared", "own")


# ------------------------------------------------------------------------------------------------
# Shared helpers


def safe_sqrt(s: jax.Array) -> jax.Array:
    """``sqrt(s)`` whose gradient is 0 (not NaN) at ``s == 0``."""
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def safe_norm(x: jax.Array, axis=None) -> jax.Array:
    """L2 norm of ``x`` (over ``axis``) with a finite gradient at 0."""
    return safe_sqrt(jnp.sum(jnp.square(x), axis=axis))


def tree_sub(a, b):
    """``a - b`` leafwise."""
    return jax.tree.map(lambda x, y: x - y.astype(x.dtype), a, b)


def params_norm(tree) -> jax.Array:
    """L2 norm over the ``params`` of a variables-like tree (BN running statistics skipped)."""
    p = tree["params"] if isinstance(tree, dict) and "params" in tree else tree
    return safe_sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(p)))


def write_rows(updates, rows: jax.Array, value):
    """Replaces the rows of ``updates`` (``[N, ...]``) where ``rows`` (``[N]`` bool) by ``value``."""

    def f(u, v):
        m = rows.reshape((-1,) + (1,) * (u.ndim - 1))
        return jnp.where(m, v[None].astype(u.dtype), u)

    return jax.tree.map(f, updates, value)


def attacker_ranks(client_ids: jax.Array, is_malicious: jax.Array) -> jax.Array:
    """``[N]`` int32: each attacker row's rank among the round's attackers by client id (benign: -1)."""
    below = (client_ids[None, :] < client_ids[:, None]) & is_malicious[None, :]
    rank = jnp.sum(below, axis=1).astype(jnp.int32)
    return jnp.where(is_malicious, rank, -1)


def attacker_data(c: CraftContext, mode: str = "first") -> tuple[jax.Array, jax.Array, jax.Array]:
    """The training data of the round's shared backdoored model.

    Args:
      c: the craft context.
      mode: ``"first"``: the shard of the sampled attacker with the smallest client id (the
        official code trains on attacker 0's loader); ``"pooled"``: all sampled attackers' shards
        in one padded index row.

    Returns:
      ``(idx [L] int32, count int32, ref_row int32)``: an index row for
      :func:`marsjax.client.make_local_train`, its count, and the update row of the first
      attacker (whose simulator-trained row is the benign reference where one is needed).
    """
    big = jnp.iinfo(jnp.int32).max
    ref_row = jnp.argmin(jnp.where(c.is_malicious, c.client_ids, big)).astype(jnp.int32)
    if mode == "first":
        return c.data.indices[c.client_ids[ref_row]], c.counts[ref_row], ref_row
    if mode == "pooled":
        rows = c.data.indices[c.client_ids]  # [N, L]
        length = rows.shape[1]
        valid = (jnp.arange(length)[None, :] < c.counts[:, None]) & c.is_malicious[:, None]
        flat, vflat = rows.reshape(-1), valid.reshape(-1)
        order = jnp.argsort(~vflat, stable=True)
        return flat[order], jnp.sum(vflat).astype(jnp.int32), ref_row
    raise ValueError(f"data must be one of {DATA_MODES}, got {mode!r}")


def forward(model, normalize, params, batch_stats, x, train: bool = True):
    """``model(normalize(x))`` -> ``(logits [B, C], new batch_stats)``, with or without BN."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
        if train:
            logits, new = model.apply(variables, normalize(x), train=True, mutable=["batch_stats"])
            return logits, new["batch_stats"]
        return model.apply(variables, normalize(x), train=False), batch_stats
    return model.apply(variables, normalize(x), train=train), batch_stats


def train_each_attacker(
    key,
    updates,
    c: CraftContext,
    max_slots: int,
    one: Callable,
):
    """Writes ``one(key_j, row)`` (a delta tree) into the row of every attacker of the round.

    The attackers are visited in order of client id (slot ``j`` = rank ``j``); slots beyond the
    round's attackers are skipped (``lax.cond``). ``max_slots`` is static.
    """
    mal = c.is_malicious
    rank = attacker_ranks(c.client_ids, mal)
    n_adv = jnp.sum(mal)
    keys = jax.random.split(key, max_slots)

    def body(j, out):
        def do(out):
            hit = rank == j
            return write_rows(out, hit, one(keys[j], jnp.argmax(hit)))

        return jax.lax.cond(j < n_adv, do, lambda o: o, out)

    return jax.lax.fori_loop(0, max_slots, body, updates)


def stamp_fn(ctx: AttackContext) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    """``(x, y) -> poisoned (x, y)``: the pattern trigger on the first ``poison_fraction``."""

    def stamp(x, y):
        return poison_batch(x, y, ctx.trigger, ctx.target_label, ctx.poison_fraction)

    return stamp


def make_blind_loss(
    ctx: AttackContext,
    weights: tuple[float, float, float] = (0.3, 0.3, 0.4),
    stamp: Callable | None = None,
):
    """The blind loss ``w0 CE(clean) + w1 CE(poisoned) + w2 ||θ - θ_G||_2`` for ``make_local_train``.

    The returned ``loss_fn(params, batch_stats, x, y, key, aux)`` reads ``θ_G``'s params from
    ``aux``. The clean and the poisoned batch each pass through the model in training mode, in
    that order (BN running statistics update twice per step, as in the official code).
    """
    stamp = stamp or stamp_fn(ctx)
    w_clean, w_bd, w_dist = weights

    def loss_fn(params, batch_stats, x, y, key, aux):
        del key
        logits, bs = forward(ctx.model, ctx.normalize, params, batch_stats, x)
        loss = w_clean * cross_entropy_loss(logits, y)
        px, py = stamp(x, y)
        logits_bd, bs = forward(ctx.model, ctx.normalize, params, bs, px)
        loss = loss + w_bd * cross_entropy_loss(logits_bd, py)
        if w_dist:
            diff = jax.tree.map(lambda p, g: p - g, params, aux)
            loss = loss + w_dist * params_norm(diff)
        return loss, bs

    return loss_fn


def make_backdoor_trainer(
    ctx: AttackContext,
    loss_fn,
    *,
    lr: float,
    epochs: int,
    steps: int | None = None,
    batch_size: int | None = None,
):
    """``make_local_train`` with the attacker's optimizer (momentum and decay of ``ctx.train``)."""
    t = ctx.train
    return make_local_train(
        ctx.model,
        ctx.normalize,
        lr=lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        batch_size=batch_size or t.batch_size,
        epochs=epochs,
        steps=steps,
        drop_last=t.drop_last,
        loss_fn=loss_fn,
    )


def identity_poison(key, x, y, state):
    """The data-level hook of attacks whose rows are rewritten by ``craft`` (no poisoning)."""
    return x, y


def pattern_trigger_fn(ctx: AttackContext):
    return lambda x, state: apply_trigger(x, ctx.trigger)


def check_common(
    lr: float, epochs: int, steps: int | None, data: str, batch_size: int | None = None
) -> None:
    """Validates the options shared by the attacks that train a backdoored model."""
    if not lr > 0:
        raise ValueError(f"attack.options.lr must be > 0, got {lr}")
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"attack.options.poison_epochs must be an integer >= 1, got {epochs}")
    if steps is not None and not (isinstance(steps, int) and steps >= 1):
        raise ValueError(
            f"attack.options.poison_steps must be None or an integer >= 1, got {steps}"
        )
    if data not in DATA_MODES:
        raise ValueError(f"attack.options.data must be one of {DATA_MODES}, got {data!r}")
    if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"attack.options.batch_size must be None or >= 1, got {batch_size}")


def benign_schedule(
    ctx: AttackContext,
    lr: float | None,
    epochs: int | None,
    steps: int | None,
    data: str,
    batch_size: int | None,
) -> tuple[float, int]:
    """``(lr, epochs)`` defaulting to the benign clients' (``ctx.train``), validated as
    :func:`check_common` does (for the attacks whose training defaults to the benign schedule)."""
    lr = ctx.train.lr if lr is None else lr
    epochs = ctx.train.local_epochs if epochs is None else epochs
    check_common(lr, epochs, steps, data, batch_size)
    return lr, epochs


# ------------------------------------------------------------------------------------------------
# The attack


def train_shared_backdoor(
    ctx: AttackContext,
    train_fn,
    key,
    c: CraftContext,
    data: str,
    aux=None,
) -> tuple[Variables, jax.Array]:
    """Trains the round's shared backdoored model from ``θ_G``; returns ``(Δ_bd, ref_row)``."""
    g = c.global_variables
    idx, count, ref_row = attacker_data(c, data)
    aux = g["params"] if aux is None else aux
    trained, _ = train_fn(g, key, c.data, idx, count, aux)
    return tree_sub(trained, g), ref_row


def model_replacement(
    ctx: AttackContext,
    scale: float = 5.0,
    lr: float = 0.055,
    poison_epochs: int = 15,
    poison_steps: int | None = None,
    batch_size: int | None = None,
    loss_weights: tuple[float, float, float] = (0.3, 0.3, 0.4),
    data: str = "first",
    uploads: str = "shared",
) -> Attack:
    """Model replacement: one blind-loss backdoored update, scaled, uploaded by every attacker.

    Args:
      ctx: static facts of the run.
      scale: multiplies the update (``fl_weight_scale``; paper 5).
      lr: attacker SGD learning rate (MARS code: 0.055).
      poison_epochs: epochs of backdoor training (``fl_poison_epochs``; 15).
      poison_steps: a fixed number of steps instead of epochs (tests).
      batch_size: attacker batch size (default: the benign clients').
      loss_weights: ``(clean CE, poisoned CE, distance)`` weights (0.3, 0.3, 0.4).
      data: ``"first"`` or ``"pooled"`` (see :func:`attacker_data`); with ``uploads="own"``
        each attacker trains on its own shard and ``data`` is not used.
      uploads: ``"shared"`` (default, the official code: one model, identical rows) or
        ``"own"`` (one model per attacker; costs one backdoor training per attacker).
    """
    check_common(lr, poison_epochs, poison_steps, data, batch_size)
    if uploads not in UPLOAD_MODES:
        raise ValueError(f"attack.options.uploads must be one of {UPLOAD_MODES}, got {uploads!r}")
    if not scale > 0:
        raise ValueError(f"attack.options.scale must be > 0, got {scale}")
    loss_weights = tuple(float(w) for w in loss_weights)
    if len(loss_weights) != 3:
        raise ValueError(f"attack.options.loss_weights needs 3 numbers, got {loss_weights}")
    train_fn = make_backdoor_trainer(
        ctx,
        make_blind_loss(ctx, loss_weights),
        lr=lr,
        epochs=poison_epochs,
        steps=poison_steps,
        batch_size=batch_size,
    )

    max_slots = max(1, min(ctx.clients_per_round, ctx.num_attackers))

    def scaled(delta):
        return jax.tree.map(lambda d: d * jnp.asarray(scale, d.dtype), delta)

    def craft(key, updates, state, c: CraftContext):
        g = c.global_variables
        if uploads == "own":

            def one(k, r):
                idx = c.data.indices[c.client_ids[r]]
                trained, _ = train_fn(g, k, c.data, idx, c.counts[r], g["params"])
                return scaled(tree_sub(trained, g))

            return train_each_attacker(key, updates, c, max_slots, one), state
        delta, _ = train_shared_backdoor(ctx, train_fn, key, c, data)
        return write_rows(updates, c.is_malicious, scaled(delta)), state

    return Attack(lambda v: EmptyState(), identity_poison, craft, pattern_trigger_fn(ctx))
