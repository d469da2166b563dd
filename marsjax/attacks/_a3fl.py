"""A3FL (Zhang, Jia, Chen, Lin, Wu, "A3FL: Adversarially Adaptive Backdoor Attacks to Federated
Learning", NeurIPS 2023; the MARS paper's Table 14). Re-implemented from the paper; no code is
copied.

A3FL optimises its trigger not only against the current global model ``θ_G`` but also against
the model the global one would turn into if the federation unlearnt the trigger, so that the
backdoor survives the benign clients' training (and defenses that fine-tune it away). Per attack
round, inside the compiled round:

1. **Trigger optimisation**, ``trigger_steps`` steps over batches of the attackers' data (the
   shard of the sampled attacker with the smallest client id, ``data="first"``, or all sampled
   attackers' shards, ``"pooled"``), every image stamped with the trigger:

   * every ``adv_every`` steps the **adversarial model** ``θ'`` is rebuilt: ``θ_G`` fine-tuned
     ``adv_steps`` SGD steps (``adv_lr``) to *unlearn* the trigger, i.e. on triggered
     images with their **true** labels (:func:`adversarial_model`);
   * the trigger moves by a signed-gradient step of ``trigger_lr`` (in units of the pixel range)
     on ``CE(θ_G(x ⊕ δ), target) + adv_lambda · CE(θ'(x ⊕ δ), target)`` and is clipped to valid
     pixels (:func:`optimise_trigger`).

   The trigger is a patch: the bounding box of the configured pattern trigger
   (``attack.trigger_top/left``), initialised with the pattern, every pixel (and channel) free.
   It persists across rounds in the state, so each round continues from the last round's.
2. **Poisoned training**: one model for all the round's attackers, trained from ``θ_G`` on the
   same data, the first ``poison_fraction`` of every batch stamped with the optimised trigger and
   relabelled to the target (``poison_epochs`` epochs at ``lr``; default the benign schedule, as
   A3FL's attackers train like benign clients), its update times ``scale`` (1) written into every
   attacker's row.
3. **ASR** is measured with the last optimised trigger.

Simplifications (documented, for the small compiled round): one shared poisoned model instead of
one per attacker (as marsjax's MRA; A3FL's attackers each train on their own data); the
adversarial model is trained with plain SGD in inference mode (BatchNorm statistics frozen); the
trigger loss uses ``θ_G`` and one adversarial model (the paper's default count of adversarial
models is small; ``adv_lambda`` weighs it). The options' defaults are our choice where the paper
gives none that fits an 8x8-to-28x28 MNIST-size model: ``trigger_steps`` 100, ``trigger_lr``
0.01, ``adv_steps`` 5, ``adv_every`` 10, ``adv_lambda`` 1, ``adv_lr`` 0.01.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from marsjax.attacks._dba import poisoned_ce_loss
from marsjax.attacks._mra import (
    attacker_data,
    benign_schedule,
    forward,
    identity_poison,
    make_backdoor_trainer,
    tree_sub,
    write_rows,
)
from marsjax.attacks.base import Attack, AttackContext, CraftContext
from marsjax.client import cross_entropy_loss

__all__ = ["A3FLState", "a3fl", "adversarial_model", "optimise_trigger", "patch_mask"]


class A3FLState(NamedTuple):
    """A3FL's state.

    Attributes:
      trigger: ``[H, W, C]`` float32 pixel values (0-255) of the patch (used where the mask is).
      attack_rounds: int32, rounds in which the trigger was optimised.
    """

    trigger: jax.Array
    attack_rounds: jax.Array


def patch_mask(mask: np.ndarray) -> np.ndarray:
    """``[H, W, 1]`` bool: the bounding box of ``mask``."""
    rows = np.flatnonzero(mask.any(axis=(1, 2)))
    cols = np.flatnonzero(mask.any(axis=(0, 2)))
    out = np.zeros_like(mask, bool)
    out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = True
    return out


def _stamp(x, t, mask):
    return jnp.where(mask, t, x.astype(jnp.float32))


def adversarial_model(model, normalize, variables, t, mask, xs, ys, lr: float):
    """``θ_G`` fine-tuned one SGD step per batch of ``xs`` ``[S, B, ...]`` / ``ys`` ``[S, B]`` to
    classify the triggered images as their true labels (unlearning the trigger); returns params."""
    bs = variables.get("batch_stats", {})

    def step(p, batch):
        x, y = batch

        def loss(q):
            logits, _ = forward(model, normalize, q, bs, _stamp(x, t, mask), train=False)
            return cross_entropy_loss(logits, y)

        g = jax.grad(loss)(p)
        return jax.tree.map(lambda a, b: a - lr * b, p, g), None

    params, _ = jax.lax.scan(step, variables["params"], (xs, ys))
    return params


def optimise_trigger(
    model,
    normalize,
    variables,
    t0,
    mask,
    xs,
    ys,
    target: int,
    *,
    trigger_lr: float,
    adv_steps: int,
    adv_every: int,
    adv_lambda: float,
    lr: float,
):
    """A3FL's trigger optimisation over the batches ``xs`` ``[S, B, ...]`` (labels ``ys``).

    Returns ``(trigger, losses [S])``: the optimised trigger and, per step, the objective
    ``CE(θ_G) + adv_lambda CE(θ')`` at the trigger before that step's move.
    """
    s = xs.shape[0]
    bs = variables.get("batch_stats", {})
    g_params = variables["params"]
    tgt = jnp.full((xs.shape[1],), target, jnp.int32)
    fmask = jnp.asarray(mask, jnp.float32)

    def objective(t, adv_params, x):
        xt = _stamp(x, t, mask)
        lg, _ = forward(model, normalize, g_params, bs, xt, train=False)
        la, _ = forward(model, normalize, adv_params, bs, xt, train=False)
        return cross_entropy_loss(lg, tgt) + adv_lambda * cross_entropy_loss(la, tgt)

    def body(i, carry):
        t, adv, losses = carry

        def rebuild(_):
            pos = (i + jnp.arange(adv_steps)) % s
            return adversarial_model(model, normalize, variables, t, mask, xs[pos], ys[pos], lr)

        adv = jax.lax.cond(i % adv_every == 0, rebuild, lambda _: adv, None)
        val, g = jax.value_and_grad(objective)(t, adv, xs[i])
        t = jnp.clip(t - trigger_lr * 255.0 * jnp.sign(g) * fmask, 0.0, 255.0)
        return t, adv, losses.at[i].set(val)

    t, _, losses = jax.lax.fori_loop(0, s, body, (t0, g_params, jnp.zeros((s,), jnp.float32)))
    return t, losses


def a3fl(
    ctx: AttackContext,
    trigger_steps: int = 100,
    trigger_lr: float = 0.01,
    adv_steps: int = 5,
    adv_every: int = 10,
    adv_lambda: float = 1.0,
    adv_lr: float = 0.01,
    lr: float | None = None,
    poison_epochs: int | None = None,
    poison_steps: int | None = None,
    batch_size: int | None = None,
    data: str = "first",
    scale: float = 1.0,
) -> Attack:
    """A3FL: a patch trigger optimised against the global model and its trigger-unlearnt copy.

    Args:
      ctx: static facts of the run.
      trigger_steps: trigger-optimisation steps per round (one batch each; 100).
      trigger_lr: signed-gradient step, as a share of the pixel range (0.01).
      adv_steps: SGD steps that build the adversarial (unlearnt) model (5).
      adv_every: rebuild the adversarial model every this many trigger steps (10).
      adv_lambda: weight of the adversarial model's loss (1).
      adv_lr: the adversarial model's SGD learning rate (0.01; its steps run with BatchNorm in
        inference mode, where the benign lr of the digits demo, 0.05, diverges).
      lr: poisoned-training learning rate (default: the benign ``train.lr``).
      poison_epochs: poisoned-training epochs (default: the benign ``train.local_epochs``).
      poison_steps: a fixed number of steps instead (tests).
      batch_size: attacker batch size (default: the benign clients').
      data: ``"first"`` or ``"pooled"`` (:func:`marsjax.attacks._mra.attacker_data`).
      scale: multiplies the uploads (1).
    """
    for name, v in (
        ("trigger_steps", trigger_steps),
        ("adv_steps", adv_steps),
        ("adv_every", adv_every),
    ):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"attack.options.{name} must be an integer >= 1, got {v}")
    if not trigger_lr > 0 or not scale > 0 or not adv_lr > 0 or not adv_lambda >= 0:
        raise ValueError("attack.options.trigger_lr, adv_lr and scale must be > 0, adv_lambda >= 0")
    lr, poison_epochs = benign_schedule(ctx, lr, poison_epochs, poison_steps, data, batch_size)
    bs = batch_size or ctx.train.batch_size
    h, w, ch = ctx.image_shape
    mask = jnp.asarray(patch_mask(np.asarray(ctx.trigger.mask)))
    t0 = np.broadcast_to(np.asarray(ctx.trigger.value, np.float32), (h, w, ch)).copy()

    def stamp(x, t):
        return _stamp(x, t, mask)

    train_fn = make_backdoor_trainer(
        ctx,
        poisoned_ce_loss(ctx, stamp),
        lr=lr,
        epochs=poison_epochs,
        steps=poison_steps,
        batch_size=batch_size,
    )

    def init(global_variables) -> A3FLState:
        return A3FLState(jnp.asarray(t0), jnp.int32(0))

    def craft(key, updates, state: A3FLState, c: CraftContext):
        g = c.global_variables
        k_batch, k_train = jax.random.split(key)
        idx, count, _ = attacker_data(c, data)
        pos = jax.random.randint(k_batch, (trigger_steps, bs), 0, jnp.maximum(count, 1))
        sample = idx[pos]
        xs, ys = c.data.x[sample], c.data.y[sample]
        t, _ = optimise_trigger(
            ctx.model,
            ctx.normalize,
            g,
            state.trigger,
            mask,
            xs,
            ys,
            ctx.target_label,
            trigger_lr=trigger_lr,
            adv_steps=adv_steps,
            adv_every=adv_every,
            adv_lambda=adv_lambda,
            lr=adv_lr,
        )
        trained, _ = train_fn(g, k_train, c.data, idx, count, t)
        delta = jax.tree.map(lambda d: d * jnp.asarray(scale, d.dtype), tree_sub(trained, g))
        return write_rows(updates, c.is_malicious, delta), A3FLState(t, state.attack_rounds + 1)

    def trigger(x, state: A3FLState):
        return stamp(x, state.trigger)

    return Attack(init, identity_poison, craft, trigger)
