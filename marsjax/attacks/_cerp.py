"""CerP (Lyu, Han, Wang, Liu, Wang, Li, Zhang, "Poisoning with Cerberus: Stealthy and Colluded
Backdoor Attack against Federated Learning", AAAI 2023), as the MARS code runs it
(arXiv:2509.20383, mars_spec §2.3). Re-implemented from the spec; no code is copied.

* **Trigger**: a distributed pixel trigger of 4 pieces of 6 pixels (row 0, columns 0-5 and 9-14;
  row 4, the same columns) with initial value 1 (white), kept in normalised input space. Attacker
  with client id ``i`` stamps piece ``i mod 4`` (DBA style); the test images get the whole
  trigger.
* **Trigger fine-tuning**, every attack round, on the current global model (inference mode):
  ``passes`` pass(es) over the attackers' data, per batch ``t <- t - step * ∇_t CE(F(x ⊕ t),
  target)``, then projection onto the L2 ball of radius ``radius`` around the initial trigger and
  clamping to ``clamp`` (step 0.1, radius 10, [-2, 2]).
* **Poisoned training**, per attacker, from ``θ_G``, ``poison_epochs`` epochs of SGD (``lr``) on its
  own shard with the loss
  ``CE(poisoned batch) + param_coef ||θ - θ_normal||_2 + cos_coef Σ_{i<j} cos(θ - θ_G, Δ_i)``,
  where ``θ_normal`` is the attacker's normally trained model and ``Δ_i`` are the updates of the
  attackers finished before it in this round (the attackers run in order of client id).

How it maps onto the simulator: the ``poison`` hook is the identity, so the simulator's own local
training of an attacker's row (benign epochs and lr) *is* its normal model ``θ_normal``; ``craft``
then replaces each attacker row with its poisoned update. The cosine sum uses
``Σ_i cos(u, Δ_i) = u · (Σ_i Δ_i / ||Δ_i||) / ||u||``, so one running sum replaces the list of
previous updates.

Differences from the official code and choices where it is silent:

* Unlike MRA and 3DFed, every CerP attacker trains its own model (the cosine term couples them);
  the spec's shared-model rule (§6.12) applies to those two attacks only.
* The fine-tuning step is a plain gradient step (not its sign); the model is in inference mode
  and the whole batch is stamped with the whole trigger.
* Poisoned training starts from the global model by default; the spec reads "trains a normal
  model (2 epochs) and then 15 poison epochs", which may mean continuing from the normal model:
  ``start="normal"`` does that (parameters and BatchNorm statistics of ``θ_normal``; the upload is
  still ``θ - θ_G``). The cosine regulariser is taken between updates (``θ - θ_G``) and
  parameters only.
* On images narrower than 15 pixels (8x8 digits) the pieces are scaled down: rows 0 and 4,
  columns ``0..L-1`` and ``L+1..2L`` with ``L = (W - 2) // 2``.
* No update scaling (``scale`` = 1).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from marsjax.attacks._mra import (
    attacker_data,
    attacker_ranks,
    check_common,
    forward,
    identity_poison,
    make_backdoor_trainer,
    safe_sqrt,
    tree_sub,
    write_rows,
)
from marsjax.attacks.base import Attack, AttackContext, CraftContext
from marsjax.client import cross_entropy_loss

__all__ = ["CerPState", "cerp", "cerp_pieces"]


class CerPState(NamedTuple):
    """CerP's state.

    Attributes:
      trigger: ``[H, W, C]`` float32 trigger values in normalised input space (used where the
        piece masks are set).
      attack_rounds: int32, rounds in which the trigger was fine-tuned.
    """

    trigger: jax.Array
    attack_rounds: jax.Array


def cerp_pieces(image_shape: tuple[int, int, int]) -> np.ndarray:
    """``[4, H, W, 1]`` bool: the four pieces of the distributed trigger."""
    h, w = image_shape[0], image_shape[1]
    if h < 5 or w < 3:
        raise ValueError(f"CerP's trigger needs images of at least 5x3 pixels, got {h}x{w}")
    if w >= 15:
        spans = ((0, 6), (9, 15))
    else:
        n = max(1, (w - 2) // 2)
        spans = ((0, n), (n + 1, 2 * n + 1))
    out = np.zeros((4, h, w, 1), bool)
    i = 0
    for row in (0, 4):
        for a, b in spans:
            out[i, row, a:b, 0] = True
            i += 1
    return out


def _affine_of(normalize, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``normalize(x) = a * x + b`` per channel (x in uint8 scale): returns ``(a, b)``."""
    zero = np.asarray(normalize(jnp.zeros((1, 1, 1, channels), jnp.float32))).reshape(-1)
    one = np.asarray(normalize(jnp.full((1, 1, 1, channels), 255.0, jnp.float32))).reshape(-1)
    return (one - zero) / 255.0, zero


def cerp(
    ctx: AttackContext,
    lr: float = 0.055,
    poison_epochs: int = 15,
    poison_steps: int | None = None,
    batch_size: int | None = None,
    data: str = "first",
    trigger_step: float = 0.1,
    trigger_radius: float = 10.0,
    trigger_clamp: tuple[float, float] = (-2.0, 2.0),
    trigger_passes: int = 1,
    trigger_init: float = 1.0,
    param_coef: float = 0.001,
    cos_coef: float = 0.001,
    distributed: bool = True,
    scale: float = 1.0,
    start: str = "global",
) -> Attack:
    """CerP: a fine-tuned distributed trigger and per-attacker regularised poisoned training.

    Args:
      ctx: static facts of the run.
      lr: attackers' poisoned-training learning rate (MARS code: 0.055).
      poison_epochs: poisoned-training epochs (15).
      poison_steps: a fixed number of steps instead (tests).
      batch_size: attacker batch size (default: the benign clients').
      data: the data the trigger is fine-tuned on: ``"first"`` attacker's shard or ``"pooled"``.
      trigger_step: fine-tuning gradient step (0.1).
      trigger_radius: L2 radius around the initial trigger (10).
      trigger_clamp: value range in normalised space ((-2, 2)).
      trigger_passes: passes over the data per round (1).
      trigger_init: initial pixel value in [0, 1] (1 = white).
      param_coef: weight of ``||θ - θ_normal||_2`` (0.001).
      cos_coef: weight of the cosine sum (0.001).
      distributed: each attacker stamps its own piece (else the whole trigger).
      scale: multiplies the uploaded updates (1).
      start: where poisoned training starts: ``"global"`` (``θ_G``) or ``"normal"`` (the
        attacker's normally trained model ``θ_normal``, BatchNorm statistics included).
    """
    check_common(lr, poison_epochs, poison_steps, data, batch_size)
    if not (isinstance(trigger_passes, int) and trigger_passes >= 0):
        raise ValueError(
            f"attack.options.trigger_passes must be an integer >= 0, got {trigger_passes}"
        )
    if not trigger_radius > 0 or not scale > 0:
        raise ValueError("attack.options.trigger_radius and scale must be > 0")
    if start not in ("global", "normal"):
        raise ValueError(f"attack.options.start must be 'global' or 'normal', got {start!r}")
    lo, hi = trigger_clamp
    if not lo < hi:
        raise ValueError(f"attack.options.trigger_clamp must be (low, high), got {trigger_clamp}")

    h, w, ch = ctx.image_shape
    pieces = cerp_pieces(ctx.image_shape)  # [4, H, W, 1]
    full = pieces.any(axis=0)  # [H, W, 1]
    a, b = _affine_of(ctx.normalize, ch)
    t0 = np.broadcast_to(a * 255.0 * trigger_init + b, (h, w, ch)).astype(np.float32)
    t0 = np.clip(t0, lo, hi)
    bs = batch_size or ctx.train.batch_size
    max_slots = max(1, min(ctx.clients_per_round, ctx.num_attackers))

    def to_pixels(t):
        return (t - jnp.asarray(b)) / jnp.asarray(a)

    def stamp(x, t, mask):
        """``x`` (uint8 or float pixels) with ``t`` (normalised) written where ``mask``."""
        return jnp.where(jnp.asarray(mask), to_pixels(t), x.astype(jnp.float32))

    def poison(x, y, t, mask):
        k = int(np.floor(ctx.poison_fraction * x.shape[0]))
        hit = jnp.arange(x.shape[0]) < k
        xs = jnp.where(hit[:, None, None, None], stamp(x, t, mask), x.astype(jnp.float32))
        ys = jnp.where(hit, jnp.asarray(ctx.target_label, y.dtype), y)
        return xs, ys

    def loss_fn(params, batch_stats, x, y, key, aux):
        del key
        normal, prev_dir, g_params, mask, t = aux
        px, py = poison(x, y, t, mask)
        logits, new_bs = forward(ctx.model, ctx.normalize, params, batch_stats, px)
        loss = cross_entropy_loss(logits, py)
        sq = sum(
            jnp.sum(jnp.square(p - q))
            for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(normal))
        )
        loss = loss + param_coef * safe_sqrt(sq)
        u = [p - q for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(g_params))]
        dot = sum(jnp.sum(ui * si) for ui, si in zip(u, jax.tree.leaves(prev_dir)))
        un = safe_sqrt(sum(jnp.sum(jnp.square(ui)) for ui in u))
        cos_sum = jnp.where(un > 0, dot / jnp.where(un > 0, un, 1.0), 0.0)
        return loss + cos_coef * cos_sum, new_bs

    train_fn = make_backdoor_trainer(
        ctx, loss_fn, lr=lr, epochs=poison_epochs, steps=poison_steps, batch_size=batch_size
    )

    def init(global_variables) -> CerPState:
        return CerPState(jnp.asarray(t0), jnp.int32(0))

    def finetune(t, variables, data_, idx, count):
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        safe = jnp.maximum(count, 1)
        nb = ((count + bs - 1) // bs) * trigger_passes
        target = jnp.full((bs,), ctx.target_label, jnp.int32)

        def loss(tt, x):
            logits, _ = forward(
                ctx.model, ctx.normalize, params, batch_stats, stamp(x, tt, full), train=False
            )
            return cross_entropy_loss(logits, target)

        def body(i, tt):
            pos = (i * bs + jnp.arange(bs)) % safe
            x = data_.x[idx[pos]]
            tt = tt - trigger_step * jax.grad(loss)(tt, x) * jnp.asarray(full, tt.dtype)
            d = tt - jnp.asarray(t0)
            nrm = jnp.sqrt(jnp.sum(jnp.square(d)))
            d = jnp.where(nrm > trigger_radius, d * (trigger_radius / jnp.maximum(nrm, 1e-12)), d)
            return jnp.clip(jnp.asarray(t0) + d, lo, hi)

        return jax.lax.fori_loop(0, nb, body, t)

    def craft(key, updates, state: CerPState, c: CraftContext):
        g = c.global_variables
        mal = c.is_malicious
        idx, count, _ = attacker_data(c, data)
        t = finetune(state.trigger, g, c.data, idx, count)
        rank = attacker_ranks(c.client_ids, mal)
        n_adv = jnp.sum(mal)
        keys = jax.random.split(key, max_slots)
        zero_dir = jax.tree.map(jnp.zeros_like, g["params"])
        piece_masks = jnp.asarray(pieces)

        def one(j, carry):
            out, prev_dir = carry

            def do(carry):
                out, prev_dir = carry
                hit = rank == j
                r = jnp.argmax(hit)
                normal = jax.tree.map(lambda p, u: p + u[r], g, updates)  # θ_normal, BN too
                cid = c.client_ids[r]
                mask = piece_masks[cid % 4] if distributed else jnp.asarray(full)
                trained, _ = train_fn(
                    normal if start == "normal" else g,
                    keys[j],
                    c.data,
                    c.data.indices[cid],
                    c.counts[r],
                    (normal["params"], prev_dir, g["params"], mask, t),
                )
                delta = tree_sub(trained, g)
                dn = safe_sqrt(
                    sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(delta["params"]))
                )
                inv = jnp.where(dn > 0, 1.0 / jnp.where(dn > 0, dn, 1.0), 0.0)
                prev_dir = jax.tree.map(lambda s, d: s + d * inv, prev_dir, delta["params"])
                delta = jax.tree.map(lambda d: d * jnp.asarray(scale, d.dtype), delta)
                return write_rows(out, hit, delta), prev_dir

            return jax.lax.cond(j < n_adv, do, lambda cc: cc, (out, prev_dir))

        out, _ = jax.lax.fori_loop(0, max_slots, one, (updates, zero_dir))
        return out, CerPState(t, state.attack_rounds + 1)

    def trigger(x, state: CerPState):
        return stamp(x, state.trigger, full)

    return Attack(init, identity_poison, craft, trigger)
