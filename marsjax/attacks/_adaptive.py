"""The adaptive attack on MARS (Wan et al., "MARS: A Malignity-Aware Backdoor Defense in Federated
Learning", NeurIPS 2025, arXiv:2509.20383, §5.2 and Table 3; mars_spec §2.3, §6.15).

The attacker knows MARS scores models by backdoor energy (BE) and trains the backdoor while
keeping BE low::

    min_θ  E_{(x, y) ~ D̂} CE(F(x; θ), y)  +  λ Σ_l Σ_k BE_k^(l)(θ)

where ``D̂`` is the attacker's data with the first ``poison_fraction`` of every batch stamped with
the trigger and relabelled, and the BE sum runs over the output channels of the conv layers (with
the gain of the BatchNorm that follows each, MARS's ``layers="conv_bn"``), computed by the very
function MARS uses (:func:`marsjax.mars.backdoor_energy`), on the model's current
parameters and running statistics. ``λ`` is ``lam`` (the paper sweeps 1e-4, 1e-3, 0.01, 0.05,
0.1). All the round's attackers upload one shared model trained from ``θ_G`` (``lr`` 0.055,
``poison_epochs`` 15, the data of :func:`marsjax.attacks._mra.attacker_data`); no scaling.

``form="code"`` is the released code's variant instead: ``0.3 CE(clean) + 0.3 CE(poisoned) +
λ Σ σ_max(W)^2`` over every parameter PyTorch names ``*weight`` (conv kernels viewed as
``[C_out, C_in kh kw]``, dense kernels, and BatchNorm scales, whose ``σ_max`` is ``||γ||_2``): squared
per-layer spectral norms rather than per-channel BE (mars_spec §2.3). The code hard-codes
``λ = 1e-4``.

Differences: the paper's form is the default (the issue asks for it; the code's form is selectable);
the BE gradient flows through the conv kernels and the BN scales, not through the running variance
(a running statistic, not a trained parameter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marsjax.attacks._mra import (
    check_common,
    forward,
    identity_poison,
    make_backdoor_trainer,
    pattern_trigger_fn,
    stamp_fn,
    train_shared_backdoor,
    write_rows,
)
from marsjax.attacks.base import Attack, AttackContext, CraftContext, EmptyState
from marsjax.client import cross_entropy_loss

__all__ = ["FORMS", "adaptive_mars"]

FORMS = ("paper", "code")


def _code_spectral_sum(params) -> jax.Array:
    """``Σ σ_max(W.view(out, -1))^2`` over PyTorch's ``*weight`` parameters (conv, dense, BN)."""
    total = jnp.float32(0.0)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel" and leaf.ndim == 4:
            m = jnp.transpose(leaf, (3, 2, 0, 1)).reshape(leaf.shape[3], -1)
            total = total + jnp.square(jnp.linalg.norm(m, ord=2))
        elif name == "kernel" and leaf.ndim == 2:
            total = total + jnp.square(jnp.linalg.norm(leaf, ord=2))
        elif name == "scale" and leaf.ndim == 1:
            total = total + jnp.sum(jnp.square(leaf))
    return total


def adaptive_mars(
    ctx: AttackContext,
    lam: float = 1e-4,
    form: str = "paper",
    lr: float = 0.055,
    poison_epochs: int = 15,
    poison_steps: int | None = None,
    batch_size: int | None = None,
    data: str = "first",
    scale: float = 1.0,
) -> Attack:
    """Backdoor training with a backdoor-energy penalty, against MARS.

    Args:
      ctx: static facts of the run.
      lam: ``λ``, the weight of the energy term (paper: 1e-4 ... 0.1).
      form: ``"paper"`` (CE + λ Σ BE over conv+BN channels) or ``"code"`` (module docstring).
      lr: attacker SGD learning rate (0.055).
      poison_epochs: training epochs (15).
      poison_steps: a fixed number of steps instead (tests).
      batch_size: attacker batch size (default: the benign clients').
      data: ``"first"`` or ``"pooled"``.
      scale: multiplies the uploaded update (the paper: none, 1).
    """
    check_common(lr, poison_epochs, poison_steps, data, batch_size)
    if form not in FORMS:
        raise ValueError(f"attack.options.form must be one of {FORMS}, got {form!r}")
    if not lam >= 0:
        raise ValueError(f"attack.options.lam must be >= 0, got {lam}")
    if not scale > 0:
        raise ValueError(f"attack.options.scale must be > 0, got {scale}")
    stamp = stamp_fn(ctx)

    if form == "paper":
        from marsjax.defenses import energy

        x0 = jax.ShapeDtypeStruct((1, *ctx.image_shape), jnp.float32)
        shapes = jax.eval_shape(ctx.model.init, jax.random.key(0), x0)
        layout = energy.energy_layout(
            shapes, layers="conv_bn", module_order=energy.module_call_order(ctx.model, x0)
        )
        if not layout:
            raise ValueError(
                "the adaptive attack needs a model with convolutions (MARS scores them)"
            )

        def penalty(params, batch_stats):
            variables = {"params": params}
            if batch_stats:
                variables["batch_stats"] = jax.lax.stop_gradient(batch_stats)
            be = energy.backdoor_energy(variables, layout=layout)
            return sum(jnp.sum(b) for b in be)

        def loss_fn(params, batch_stats, x, y, key, aux):
            px, py = stamp(x, y)
            logits, new_bs = forward(ctx.model, ctx.normalize, params, batch_stats, px)
            return cross_entropy_loss(logits, py) + lam * penalty(params, batch_stats), new_bs

    else:

        def loss_fn(params, batch_stats, x, y, key, aux):
            logits, bs = forward(ctx.model, ctx.normalize, params, batch_stats, x)
            loss = 0.3 * cross_entropy_loss(logits, y)
            px, py = stamp(x, y)
            logits_bd, bs = forward(ctx.model, ctx.normalize, params, bs, px)
            loss = loss + 0.3 * cross_entropy_loss(logits_bd, py)
            return loss + lam * _code_spectral_sum(params), bs

    train_fn = make_backdoor_trainer(
        ctx, loss_fn, lr=lr, epochs=poison_epochs, steps=poison_steps, batch_size=batch_size
    )

    def craft(key, updates, state, c: CraftContext):
        delta, _ = train_shared_backdoor(ctx, train_fn, key, c, data)
        if scale != 1.0:
            delta = jax.tree.map(lambda d: d * jnp.asarray(scale, d.dtype), delta)
        return write_rows(updates, c.is_malicious, delta), state

    return Attack(lambda v: EmptyState(), identity_poison, craft, pattern_trigger_fn(ctx))
