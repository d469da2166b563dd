"""CerP (Lyu, Han, Wang, Liu, Wang, Li, Zhang, "Poisoning with Cerberus: Stealthy and Colluded
Backdoor Attack against Federated Learning", AAAI 2023), as the MARS code runs it
(arXiv:2509.20383, mars_spec §2.3). Re-implemented from reading the official code and the spec;
no code is copied.

Common to both variants:

* **Trigger**: 24 pixels in four pieces of 6 (row 0, columns 0-5 and 9-14; row 4, the same
  columns), initial value ``trigger_init`` = 1 (white) on every channel, held in normalised input
  space (``(pixel / 255 - mean) / std``).
* **Trigger fine-tuning**, on the round's global model in inference mode: ``trigger_passes`` = 1
  pass over attacker data, the whole batch stamped with the whole trigger and labelled with the
  target, per batch ``t <- t - trigger_step * ∇_t CE`` (a plain gradient step of 0.1, not its
  sign), then projection onto the L2 ball of radius ``trigger_radius`` = 10 around the initial
  trigger, and clamping.
* **Poisoned training**, per attacker, from the global model ``θ_G`` (``start="global"``, as the
  official code: its local model is a copy of the global one), ``poison_epochs`` = 15 epochs of
  SGD (momentum and weight decay of the benign clients) on its own shard, the first
  ``poison_fraction`` of each batch stamped and relabelled, with the loss
  ``CE + param_coef ||θ - θ_normal||_2 + cos_coef · (cosine sum)`` (both weights 0.001; the norm
  over the trainable parameters, not squared), where ``θ_normal`` is the attacker's normally
  trained model (the benign optimizer for the benign local epochs, from ``θ_G``) and the cosine
  sum runs over the updates ``Δ_i`` of the attackers that finished before it in this round (the
  attackers run in order of client id).
* The test images (ASR) carry the whole 24-pixel trigger.

``variant="official"`` (the default): what the MARS code runs (``training.py``: ``run``,
``Cerp_run_fl_round``, ``cifar100_trigger`` (the tuning, used for every task),
``Cerp_train_with_grad_control``, ``poison_per_batch``/``add_pixel_pattern``, ``CerP_test``,
``model_cosine_similarity``, ``model_dist_norm_var``; ``tasks/task.py::make_optimizer``):

* every attacker stamps the **whole** trigger (``add_pixel_pattern`` is always called with
  ``user_id=5``, its "all pieces" case) (``distributed=False``);
* the attacker's optimizer is the task's own (``make_optimizer``), so its learning rate is the
  benign clients' ``train.lr`` (0.1 in ``cifar_fed.yaml`` and ``mnist_fed.yaml``; 0.01 for
  CIFAR-100), not the 0.055 hard-coded for the other attacks in ``run_fl_round`` (``lr=None``);
* the tuning restarts from the **initial** trigger every round (``run`` keeps passing its
  untouched initial trigger; the tuned one returned by ``Cerp_run_fl_round`` is dropped)
  (``trigger_restart=True``), and runs over the data of **every** attacker of the federation,
  sampled this round or not (the loaders of clients ``0 .. fl_number_of_adversaries - 1``)
  (``data="all"``);
* the clamp is applied **once, after** the pass (``trigger_clamp_at="end"``), to ``[-3, 3]`` on
  MNIST and ``[-2, 2]`` on every other task (literal constants, not the range of normalised
  pixel values; ``trigger_clamp="official"`` maps "MNIST" to one-channel images); the initial
  trigger itself is never clamped;
* the ASR is measured with the **initial** (untuned, unclamped) trigger: ``CerP_test`` gets the
  initial trigger from ``run`` (``test_trigger="initial"``); the tuned trigger only trains;
* the cosine sum is ``Σ_{i<k} mean_l cos(θ_l, Δ_{i,l})``: per parameter tensor ``l`` (weight
  and bias separately), the cosine between the attacker's current **parameters** (not its
  update) and the earlier attacker's update, averaged over the tensors (``cos_term="layers"``).

``variant="distributed"``: marsjax's earlier reading of spec §2.3 ("distributed pixel trigger of
4 x 6 pixels"), kept unchanged: attacker with client id ``i`` stamps only piece ``i mod 4`` (DBA
style) (``distributed=True``); lr 0.055 (the official attacker rate of MRA and 3DFed); the tuning
continues from last round's tuned trigger (``trigger_restart=False``) on the shard of the
sampled attacker with the smallest client id (``data="first"``), with the initial trigger and
every step clamped to ``[-2, 2]`` (``trigger_clamp=(-2, 2)``, ``trigger_clamp_at="step"``); the
ASR is measured with the tuned trigger (``test_trigger="tuned"``); the cosine is taken between
whole updates, ``Σ_i cos(θ - θ_G, Δ_i)`` (``cos_term="update"``).

Each of those options defaults to ``None``, "as the variant says"; a value given explicitly
overrides the variant's. ``trigger_clamp="pixels"`` clamps to the dataset's range of normalised
pixel values, ``[(0 - mean) / std, (1 - mean) / std]`` per channel (neither variant does).

How it maps onto the simulator: the ``poison`` hook is the identity, so the simulator's own local
training of an attacker's row (benign epochs and lr) *is* its normal model ``θ_normal``; ``craft``
then replaces each attacker row with its poisoned update ``θ - θ_G`` (BatchNorm statistics
included). A running sum of the earlier updates' directions replaces the official list of saved
updates: ``Σ_i cos(a, Δ_i) = a · (Σ_i Δ_i / ||Δ_i||) / ||a||`` (per tensor for ``"layers"``).

Differences from the official code that marsjax keeps deliberately:

* Only the round's sampled attackers train. The official round trains every attacker of the
  federation (20; a normal model and 15 poison epochs each) although only the 4 sampled ones
  are aggregated, so attacker
  ``k``'s cosine sum covers attackers ``0 .. k-1`` of the whole federation; here it covers the
  sampled attackers with smaller ids. Training every attacker would cost 5x the attack's time for
  uploads nobody aggregates.
* Three-channel images: the official tuning writes channel 0's trigger value into all three
  channels, but training stamps each channel's own value (channels 1 and 2 keep their initial
  value; on CIFAR-10 that is above 2, so they are stamped at 2). Here every channel is tuned
  with the value it is stamped with. On one-channel data (the MNIST setting) the two agree.
* The tuning batches are the attacker data in client order, the last batch wrapping around (the
  official loaders shuffle and drop the last partial batch), and the poisoned share of a training
  batch is ``floor(poison_fraction * B)`` (the official ``index < 64 * 0.5`` with the global
  batch size of 64).
* A parameter tensor with zero norm contributes a cosine of 0 with zero gradient (PyTorch's
  ``cosine_similarity`` divides by ``eps`` = 1e-8 there).
* On images narrower than 15 pixels (8x8 digits) the pieces are scaled down: rows 0 and 4,
  columns ``0..L-1`` and ``L+1..2L`` with ``L = (W - 2) // 2``.
* ``start="normal"`` (continue from ``θ_normal``, parameters and BatchNorm statistics; the
  upload is still ``θ - θ_G``) is an alternative reading of the spec, not the official code.
  No update scaling (``scale`` = 1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

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

__all__ = ["CERP_VARIANTS", "CerPState", "cerp", "cerp_pieces"]

# What each variant sets for the options left at None (see the module docstring). ``lr=None`` in
# the official variant means the benign clients' learning rate.
CERP_VARIANTS: dict[str, dict[str, Any]] = {
    "official": {
        "lr": None,
        "data": "all",
        "distributed": False,
        "trigger_clamp": "official",
        "trigger_clamp_at": "end",
        "trigger_restart": True,
        "test_trigger": "initial",
        "cos_term": "layers",
    },
    "distributed": {
        "lr": 0.055,
        "data": "first",
        "distributed": True,
        "trigger_clamp": (-2.0, 2.0),
        "trigger_clamp_at": "step",
        "trigger_restart": False,
        "test_trigger": "tuned",
        "cos_term": "update",
    },
}
_DATA = ("first", "pooled", "all")


class CerPState(NamedTuple):
    """CerP's state.

    Attributes:
      trigger: ``[H, W, C]`` float32, the trigger of the last attack round's poisoned training
        (tuned), in normalised input space (used where the piece masks are set).
      attack_rounds: int32, rounds in which the trigger was fine-tuned.
    """

    trigger: jax.Array
    attack_rounds: jax.Array


def cerp_pieces(image_shape: tuple[int, int, int]) -> np.ndarray:
    """``[4, H, W, 1]`` bool: the four pieces of the trigger."""
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


def cerp_clamp_bounds(clamp, normalize, channels: int) -> tuple[Any, Any]:
    """The tuned trigger's value range in normalised space: ``(low, high)``.

    ``"official"``: ``(-3, 3)`` on one-channel images (the official code's MNIST constants),
    ``(-2, 2)`` otherwise; ``"pixels"``: per channel ``(normalize(0), normalize(255))`` as
    ``[C]`` arrays; a pair of numbers: itself.
    """
    bad = f"attack.options.trigger_clamp must be 'official', 'pixels' or (low, high), got {clamp!r}"
    if isinstance(clamp, str):
        if clamp == "official":
            return (-3.0, 3.0) if channels == 1 else (-2.0, 2.0)
        if clamp == "pixels":
            a, b = _affine_of(normalize, channels)
            lo, hi = b, a * 255.0 + b
            return np.minimum(lo, hi).astype(np.float32), np.maximum(lo, hi).astype(np.float32)
        raise ValueError(bad)
    try:
        lo, hi = (float(v) for v in clamp)
    except (TypeError, ValueError):
        raise ValueError(bad) from None
    if not lo < hi:
        raise ValueError(f"attack.options.trigger_clamp must be (low, high), got {clamp}")
    return lo, hi


def _poison_batch(x, y, pixels, mask, k: int, target: int):
    """The batch with its first ``k`` images carrying ``pixels`` where ``mask`` (float pixels),
    relabelled to ``target``."""
    xf = x.astype(jnp.float32)
    hit = jnp.arange(x.shape[0]) < k
    stamped = jnp.where(mask, pixels, xf)
    return (
        jnp.where(hit[:, None, None, None], stamped, xf),
        jnp.where(hit, jnp.asarray(target, y.dtype), y),
    )


def _direction(delta_params, per_tensor: bool):
    """``Δ / ||Δ||``, per tensor or over the whole tree (0 where the norm is 0)."""

    def unit(x, n):
        return x * jnp.where(n > 0, 1.0 / jnp.where(n > 0, n, 1.0), 0.0)

    if per_tensor:
        return jax.tree.map(lambda d: unit(d, safe_sqrt(jnp.sum(jnp.square(d)))), delta_params)
    n = safe_sqrt(sum(jnp.sum(jnp.square(d)) for d in jax.tree.leaves(delta_params)))
    return jax.tree.map(lambda d: unit(d, n), delta_params)


def _cos_sum(params, g_params, dir_sum, term: str):
    """The cosine sum given ``dir_sum = Σ_i _direction(Δ_i)``.

    ``"layers"``: ``mean_l Σ_i cos(θ_l, Δ_{i,l})``; ``"update"``: ``Σ_i cos(θ - θ_G, Δ_i)``.
    """
    p, s = jax.tree.leaves(params), jax.tree.leaves(dir_sum)
    if term == "layers":
        terms = []
        for pl, sl in zip(p, s):
            n = safe_sqrt(jnp.sum(jnp.square(pl)))
            terms.append(jnp.where(n > 0, jnp.sum(pl * sl) / jnp.where(n > 0, n, 1.0), 0.0))
        return sum(terms) / len(terms)
    u = [pl - gl for pl, gl in zip(p, jax.tree.leaves(g_params))]
    dot = sum(jnp.sum(ul * sl) for ul, sl in zip(u, s))
    un = safe_sqrt(sum(jnp.sum(jnp.square(ul)) for ul in u))
    return jnp.where(un > 0, dot / jnp.where(un > 0, un, 1.0), 0.0)


def _all_attackers_data(data, num_attackers: int) -> tuple[jax.Array, jax.Array]:
    """The shards of clients ``0 .. num_attackers - 1`` (every attacker of the federation) in one
    index row: ``(idx [A * L] int32, count int32)``, the valid entries first, in client order."""
    a = max(1, num_attackers)
    rows = data.indices[:a]  # [A, L]
    valid = (jnp.arange(rows.shape[1])[None, :] < data.counts[:a, None]) & (
        jnp.arange(a)[:, None] < num_attackers
    )
    flat, vflat = rows.reshape(-1), valid.reshape(-1)
    order = jnp.argsort(~vflat, stable=True)
    return flat[order], jnp.sum(vflat).astype(jnp.int32)


def cerp(
    ctx: AttackContext,
    variant: str = "official",
    lr: float | None = None,
    poison_epochs: int = 15,
    poison_steps: int | None = None,
    batch_size: int | None = None,
    data: str | None = None,
    trigger_step: float = 0.1,
    trigger_radius: float = 10.0,
    trigger_clamp: tuple[float, float] | str | None = None,
    trigger_clamp_at: str | None = None,
    trigger_passes: int = 1,
    trigger_init: float = 1.0,
    trigger_restart: bool | None = None,
    test_trigger: str | None = None,
    param_coef: float = 0.001,
    cos_coef: float = 0.001,
    cos_term: str | None = None,
    distributed: bool | None = None,
    scale: float = 1.0,
    start: str = "global",
) -> Attack:
    """CerP: a fine-tuned pixel trigger and per-attacker regularised poisoned training.

    Options left at ``None`` take the value of ``variant`` (:data:`CERP_VARIANTS`).

    Args:
      ctx: static facts of the run.
      variant: ``"official"`` (the MARS code) or ``"distributed"`` (one piece per attacker).
      lr: attackers' poisoned-training learning rate (official: the benign ``train.lr``;
        distributed: 0.055).
      poison_epochs: poisoned-training epochs (15).
      poison_steps: a fixed number of steps instead (tests).
      batch_size: attacker batch size (default: the benign clients').
      data: the trigger-tuning data: ``"first"`` sampled attacker's shard, ``"pooled"`` (all
        sampled attackers) or ``"all"`` (every attacker of the federation).
      trigger_step: fine-tuning gradient step (0.1).
      trigger_radius: L2 radius around the initial trigger (10).
      trigger_clamp: ``"official"`` (``[-3, 3]`` on one-channel images, else ``[-2, 2]``),
        ``"pixels"`` (the dataset's normalised pixel range) or ``(low, high)``.
      trigger_clamp_at: ``"end"`` (once after the tuning; the initial trigger is not clamped) or
        ``"step"`` (the initial trigger and every step).
      trigger_passes: passes over the data per round (1).
      trigger_init: initial pixel value in [0, 1] (1 = white).
      trigger_restart: tune from the initial trigger every round (else from last round's).
      test_trigger: what the test images carry: ``"initial"`` or ``"tuned"`` (last attack
        round's) trigger, always the whole of it.
      param_coef: weight of ``||θ - θ_normal||_2`` (0.001).
      cos_coef: weight of the cosine sum (0.001).
      cos_term: ``"layers"`` (mean over tensors of ``cos(θ_l, Δ_{i,l})``) or ``"update"``
        (``cos(θ - θ_G, Δ_i)`` over all parameters).
      distributed: each attacker stamps its own piece (else the whole trigger).
      scale: multiplies the uploaded updates (1).
      start: where poisoned training starts: ``"global"`` (``θ_G``) or ``"normal"`` (the
        attacker's normally trained model ``θ_normal``, BatchNorm statistics included).
    """
    if variant not in CERP_VARIANTS:
        raise ValueError(
            f"attack.options.variant must be one of {tuple(CERP_VARIANTS)}, got {variant!r}"
        )
    v = CERP_VARIANTS[variant]
    lr = (v["lr"] if v["lr"] is not None else ctx.train.lr) if lr is None else lr
    data = v["data"] if data is None else data
    distributed = v["distributed"] if distributed is None else distributed
    trigger_clamp = v["trigger_clamp"] if trigger_clamp is None else trigger_clamp
    trigger_clamp_at = v["trigger_clamp_at"] if trigger_clamp_at is None else trigger_clamp_at
    trigger_restart = v["trigger_restart"] if trigger_restart is None else trigger_restart
    test_trigger = v["test_trigger"] if test_trigger is None else test_trigger
    cos_term = v["cos_term"] if cos_term is None else cos_term

    if data not in _DATA:
        raise ValueError(f"attack.options.data must be one of {_DATA}, got {data!r}")
    check_common(lr, poison_epochs, poison_steps, "first", batch_size)  # data: checked above
    if not (isinstance(trigger_passes, int) and trigger_passes >= 0):
        raise ValueError(
            f"attack.options.trigger_passes must be an integer >= 0, got {trigger_passes}"
        )
    if not trigger_radius > 0 or not scale > 0:
        raise ValueError("attack.options.trigger_radius and scale must be > 0")
    if start not in ("global", "normal"):
        raise ValueError(f"attack.options.start must be 'global' or 'normal', got {start!r}")
    if trigger_clamp_at not in ("end", "step"):
        raise ValueError(
            f"attack.options.trigger_clamp_at must be 'end' or 'step', got {trigger_clamp_at!r}"
        )
    if test_trigger not in ("initial", "tuned"):
        raise ValueError(
            f"attack.options.test_trigger must be 'initial' or 'tuned', got {test_trigger!r}"
        )
    if cos_term not in ("layers", "update"):
        raise ValueError(f"attack.options.cos_term must be 'layers' or 'update', got {cos_term!r}")

    h, w, ch = ctx.image_shape
    lo, hi = cerp_clamp_bounds(trigger_clamp, ctx.normalize, ch)
    clamp_step = trigger_clamp_at == "step"
    pieces = cerp_pieces(ctx.image_shape)  # [4, H, W, 1]
    full = pieces.any(axis=0)  # [H, W, 1]
    a, b = _affine_of(ctx.normalize, ch)
    t0 = np.broadcast_to(a * 255.0 * trigger_init + b, (h, w, ch)).astype(np.float32)
    if clamp_step:
        t0 = np.clip(t0, lo, hi).astype(np.float32)
    bs = batch_size or ctx.train.batch_size
    max_slots = max(1, min(ctx.clients_per_round, ctx.num_attackers))

    def to_pixels(t):
        return (t - jnp.asarray(b)) / jnp.asarray(a)

    def stamp(x, t, mask):
        """``x`` (uint8 or float pixels) with ``t`` (normalised) written where ``mask``."""
        return jnp.where(jnp.asarray(mask), to_pixels(t), x.astype(jnp.float32))

    def clamp(t):
        return jnp.clip(t, jnp.asarray(lo), jnp.asarray(hi))

    def loss_fn(params, batch_stats, x, y, key, aux):
        del key
        normal, dir_sum, g_params, mask, t = aux
        k = int(np.floor(ctx.poison_fraction * x.shape[0]))
        px, py = _poison_batch(x, y, to_pixels(t), mask, k, ctx.target_label)
        logits, new_bs = forward(ctx.model, ctx.normalize, params, batch_stats, px)
        loss = cross_entropy_loss(logits, py)
        sq = sum(
            jnp.sum(jnp.square(p - q))
            for p, q in zip(jax.tree.leaves(params), jax.tree.leaves(normal))
        )
        loss = loss + param_coef * safe_sqrt(sq)
        return loss + cos_coef * _cos_sum(params, g_params, dir_sum, cos_term), new_bs

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
            tt = jnp.asarray(t0) + d
            return clamp(tt) if clamp_step else tt

        t = jax.lax.fori_loop(0, nb, body, t)
        return t if clamp_step else clamp(t)

    def craft(key, updates, state: CerPState, c: CraftContext):
        g = c.global_variables
        mal = c.is_malicious
        if data == "all":
            idx, count = _all_attackers_data(c.data, ctx.num_attackers)
        else:
            idx, count, _ = attacker_data(c, data)
        t = finetune(jnp.asarray(t0) if trigger_restart else state.trigger, g, c.data, idx, count)
        rank = attacker_ranks(c.client_ids, mal)
        n_adv = jnp.sum(mal)
        keys = jax.random.split(key, max_slots)
        zero_dir = jax.tree.map(jnp.zeros_like, g["params"])
        piece_masks = jnp.asarray(pieces)

        def one(j, carry):
            def do(carry):
                out, dir_sum = carry
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
                    (normal["params"], dir_sum, g["params"], mask, t),
                )
                delta = tree_sub(trained, g)
                step_dir = _direction(delta["params"], cos_term == "layers")
                dir_sum = jax.tree.map(jnp.add, dir_sum, step_dir)
                delta = jax.tree.map(lambda d: d * jnp.asarray(scale, d.dtype), delta)
                return write_rows(out, hit, delta), dir_sum

            return jax.lax.cond(j < n_adv, do, lambda cc: cc, carry)

        out, _ = jax.lax.fori_loop(0, max_slots, one, (updates, zero_dir))
        return out, CerPState(t, state.attack_rounds + 1)

    def trigger(x, state: CerPState):
        t = jnp.asarray(t0) if test_trigger == "initial" else state.trigger
        return stamp(x, t, full)

    return Attack(init, identity_poison, craft, trigger)
