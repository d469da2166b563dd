"""Partial-layer attacks (the MARS paper's Table 17, arXiv:2509.20383, mars_spec §3.5): the
backdoor is planted in part of the network only, the fully connected (FC) layers alone or the
first ``k`` convolutions plus the FC layers, to hide from a defense that scores convolutions
(MARS's default ``layers="conv_bn"`` ignores FC layers; ``layers="all"``, "MARS (all layers)",
catches the FC-only attack in the paper).

``partial`` is model replacement (:mod:`marsjax.attacks._mra`: one blind-loss backdoored model
for all the round's attackers, scaled by ``scale``) restricted to those layers:

* during backdoor training the excluded layers are frozen at the global model's values (their
  gradient is zero; the forward pass reads the global values), so the backdoor is learnt by the
  kept layers alone;
* the upload's entries of every excluded layer are then set to exactly 0: parameters and
  BatchNorm running statistics (a BatchNorm belongs to the convolution it follows);
* ``convs=0`` keeps the FC layers only, ``convs=k`` the first ``k`` convolutions in call order
  (ResNet-18's shortcut convolutions count where they are called) with their BatchNorms, plus
  the FC layers; ``convs=None`` keeps every layer (plain MRA, the table's "All layers" row).

"FC layers" are all dense layers (SimpleNet: ``fc1`` and ``fc2``; ResNet-18: ``fc``). The paper
does not name the attack the partial-layer rows are built on; MRA is the simplest of its three.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marsjax.attacks._mra import (
    check_common,
    identity_poison,
    make_backdoor_trainer,
    make_blind_loss,
    pattern_trigger_fn,
    train_shared_backdoor,
    write_rows,
)
from marsjax.attacks.base import Attack, AttackContext, CraftContext, EmptyState

__all__ = ["kept_modules", "layer_mask", "mask_tree", "partial_layer"]


def kept_modules(model, image_shape, convs: int | None) -> tuple[tuple[str, ...], ...] | None:
    """Module paths (params-relative) of the layers a partial-layer attack changes.

    Args:
      model: the flax module.
      image_shape: ``(H, W, C)``.
      convs: ``None`` (every layer: returns ``None``), or how many of the first convolutions (in
        call order) are kept besides the dense layers.

    Returns:
      The kept dense and conv modules and the BatchNorms paired with the kept convolutions.

    Raises:
      ValueError: when the model has fewer than ``convs`` convolutions.
    """
    if convs is None:
        return None
    from marsjax.mars.energy import energy_layout, module_call_order

    x0 = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x0)
    layout = energy_layout(shapes, layers="all", module_order=module_call_order(model, x0))
    conv_layers = [layer for layer in layout if layer.kind == "conv"]
    if convs > len(conv_layers):
        raise ValueError(
            f"attack.options.convs={convs} but the model has {len(conv_layers)} convolutions"
        )
    kept = [layer.path for layer in layout if layer.kind == "dense"]
    for layer in conv_layers[:convs]:
        kept.append(layer.path)
        if layer.norm is not None:
            kept.append(layer.norm)
    return tuple(kept)


def layer_mask(variables, kept) -> dict:
    """A tree of Python bools like ``variables``: True on the leaves under a kept module path
    (in ``params`` and in ``batch_stats``)."""
    kept = set(kept)

    def walk(node, path):
        if isinstance(node, dict) or hasattr(node, "items"):
            return {k: walk(v, (*path, str(k))) for k, v in node.items()}
        return any(path[: len(p)] == p for p in kept)

    return {col: walk(tree, ()) for col, tree in variables.items()}


def mask_tree(tree, mask):
    """``tree`` with the leaves where ``mask`` is False set to 0 (static mask)."""
    return jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), tree, mask)


def partial_layer(
    ctx: AttackContext,
    convs: int | None = 0,
    scale: float = 5.0,
    lr: float = 0.055,
    poison_epochs: int = 15,
    poison_steps: int | None = None,
    batch_size: int | None = None,
    loss_weights: tuple[float, float, float] = (0.3, 0.3, 0.4),
    data: str = "first",
) -> Attack:
    """Model replacement restricted to the FC layers and the first ``convs`` convolutions.

    Args:
      ctx: static facts of the run.
      convs: ``0``: FC only; ``k``: the first ``k`` convolutions + FC; ``None``: every layer.
      scale, lr, poison_epochs, poison_steps, batch_size, loss_weights, data: as
        :func:`marsjax.attacks._mra.model_replacement`.
    """
    check_common(lr, poison_epochs, poison_steps, data, batch_size)
    if convs is not None and not (isinstance(convs, int) and convs >= 0):
        raise ValueError(f"attack.options.convs must be None or an integer >= 0, got {convs}")
    if not scale > 0:
        raise ValueError(f"attack.options.scale must be > 0, got {scale}")
    loss_weights = tuple(float(w) for w in loss_weights)
    if len(loss_weights) != 3:
        raise ValueError(f"attack.options.loss_weights needs 3 numbers, got {loss_weights}")
    kept = kept_modules(ctx.model, ctx.image_shape, convs)
    blind = make_blind_loss(ctx, loss_weights)

    def loss_fn(params, batch_stats, x, y, key, aux):
        if kept is not None:  # excluded layers read the global values: zero gradient there
            m = layer_mask({"params": params}, kept)["params"]
            params = jax.tree.map(
                lambda p, g, keep: p if keep else jax.lax.stop_gradient(g.astype(p.dtype)),
                params,
                aux,
                m,
            )
        return blind(params, batch_stats, x, y, key, aux)

    train_fn = make_backdoor_trainer(
        ctx,
        loss_fn,
        lr=lr,
        epochs=poison_epochs,
        steps=poison_steps,
        batch_size=batch_size,
    )

    def craft(key, updates, state, c: CraftContext):
        delta, _ = train_shared_backdoor(ctx, train_fn, key, c, data)
        if kept is not None:
            delta = mask_tree(delta, layer_mask(delta, kept))
        delta = jax.tree.map(lambda d: d * jnp.asarray(scale, d.dtype), delta)
        return write_rows(updates, c.is_malicious, delta), state

    return Attack(lambda v: EmptyState(), identity_poison, craft, pattern_trigger_fn(ctx))
