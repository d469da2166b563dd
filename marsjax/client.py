"""Local training of one client, written to be mapped over a client axis.

A client holds a row of indices into the training set (padded to a static length) and a count.
Every step gathers a batch from the uint8 training set on the device, optionally transforms it
(an attacker stamps its trigger), normalises it and takes one SGD step. The number of steps depends
on the client's count, so the loop is a ``lax.while_loop`` with a per-client trip count: under
``lax.map`` a small client really runs fewer steps; under ``vmap`` the loop runs to the largest
trip count with the finished clients masked, so results are the same either way.

Epoch ``e`` visits the client's samples in a fresh random order (drawn from ``fold_in(key, e)``).
The last batch of an epoch is filled by wrapping around to the start of that order, so every batch
is full (no masking in the loss or in BatchNorm), unless ``drop_last`` drops it as the official
loaders do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from marsjax.types import Key, Variables

__all__ = [
    "ClientData",
    "LocalTrainFn",
    "cross_entropy_loss",
    "make_local_train",
    "make_normalize",
    "num_local_steps",
    "sgd",
]


class ClientData(NamedTuple):
    """The federation's training data, on the device once.

    Attributes:
      x: ``[n, H, W, C]`` uint8 images.
      y: ``[n]`` int32 labels.
      indices: ``[num_clients, max_len]`` int32; client ``i`` owns ``indices[i, :counts[i]]``.
      counts: ``[num_clients]`` int32.
    """

    x: jax.Array
    y: jax.Array
    indices: jax.Array
    counts: jax.Array


LocalTrainFn = Callable[..., tuple[Variables, jax.Array]]


def make_normalize(mean, std) -> Callable[[jax.Array], jax.Array]:
    """uint8 ``[..., C]`` -> float32 ``(x / 255 - mean) / std``."""
    mean = jnp.asarray(mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(std, jnp.float32)

    def normalize(x: jax.Array) -> jax.Array:
        return (x.astype(jnp.float32) * (1.0 / 255.0) - mean) * inv_std

    return normalize


def sgd(
    lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """PyTorch's ``SGD(lr, momentum, weight_decay)``: decay is added to the gradient before momentum."""
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(lr, momentum=momentum or None))
    return optax.chain(*parts)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def num_local_steps(count, batch_size: int, epochs: int, steps: int | None, drop_last: bool):
    """Steps a client with ``count`` samples runs (0 for an empty client)."""
    count = jnp.asarray(count, jnp.int32)
    per_epoch = count // batch_size if drop_last else (count + batch_size - 1) // batch_size
    if steps is not None:
        return jnp.where(per_epoch > 0, steps, 0).astype(jnp.int32)
    return (per_epoch * epochs).astype(jnp.int32)


def _default_loss(model: nn.Module, normalize):
    def loss_fn(params, batch_stats, x, y, key, aux):
        del key, aux
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
            logits, new = model.apply(variables, normalize(x), train=True, mutable=["batch_stats"])
            return cross_entropy_loss(logits, y), new["batch_stats"]
        logits = model.apply(variables, normalize(x), train=True)
        return cross_entropy_loss(logits, y), batch_stats

    return loss_fn


def make_local_train(
    model: nn.Module,
    normalize: Callable[[jax.Array], jax.Array],
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    epochs: int = 1,
    steps: int | None = None,
    drop_last: bool = False,
    batch_fn: Callable[[Key, jax.Array, jax.Array, Any], tuple[jax.Array, jax.Array]] | None = None,
    loss_fn: Callable[..., tuple[jax.Array, Any]] | None = None,
    optimizer: optax.GradientTransformation | None = None,
) -> LocalTrainFn:
    """Builds ``train(variables, key, data, idx, count, aux) -> (variables, mean_loss)``.

    Args:
      model: flax module called as ``model.apply(variables, x, train=True, mutable=...)``.
      normalize: uint8 -> float input transform.
      lr, momentum, weight_decay: PyTorch-style SGD (ignored if ``optimizer`` is given).
      batch_size: static batch size.
      epochs: local epochs (ignored if ``steps`` is set).
      steps: a fixed number of local steps.
      drop_last: drop every epoch's last partial batch.
      batch_fn: ``(key, x_uint8 [B, ...], y [B], aux) -> (x, y)`` applied to every batch before the
        loss (an attacker stamps its trigger here, driven by ``aux``).
      loss_fn: ``(params, batch_stats, x_uint8, y, key, aux) -> (loss, new_batch_stats)``;
        default: cross-entropy of the normalised batch.
      optimizer: an optax optimizer replacing the SGD above.

    The returned ``train`` takes: ``variables`` (``{"params", "batch_stats"?}``), ``key``,
    ``data`` (:class:`ClientData` or anything with ``.x`` and ``.y``), ``idx`` ``[max_len]``
    int32, ``count`` int32 and ``aux`` (any pytree handed to ``batch_fn``/``loss_fn``). It returns
    the trained variables and the mean training loss over the steps taken (0 if none).
    """
    opt = optimizer if optimizer is not None else sgd(lr, momentum, weight_decay)
    loss_fn = loss_fn or _default_loss(model, normalize)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train(variables: Variables, key: Key, data, idx: jax.Array, count, aux=None):
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        count = jnp.asarray(count, jnp.int32)
        max_len = idx.shape[0]
        total = num_local_steps(count, batch_size, epochs, steps, drop_last)
        per_epoch = jnp.maximum(
            count // batch_size if drop_last else (count + batch_size - 1) // batch_size, 1
        )
        order_key, step_key = jax.random.split(key)
        valid = jnp.arange(max_len) < count
        safe_count = jnp.maximum(count, 1)

        def epoch_order(epoch):
            # The client's valid positions in a fresh random order (padding sorts last).
            noise = jax.random.uniform(jax.random.fold_in(order_key, epoch), (max_len,))
            return jnp.argsort(jnp.where(valid, noise, 2.0)).astype(jnp.int32)

        def body(carry):
            s, params, batch_stats, opt_state, loss_sum, order = carry
            epoch = s // per_epoch
            b = s - epoch * per_epoch
            order = jax.lax.cond(b == 0, epoch_order, lambda e: order, epoch)  # once per epoch
            pos = (b * batch_size + jnp.arange(batch_size)) % safe_count
            sample = idx[order[pos]]
            x = data.x[sample]  # uint8 gather on the device
            y = data.y[sample]
            k = jax.random.fold_in(step_key, s)
            if batch_fn is not None:
                x, y = batch_fn(k, x, y, aux)
            (loss, new_bs), grads = grad_fn(params, batch_stats, x, y, k, aux)
            upd, opt_state = opt.update(grads, opt_state, params)
            params = optax.apply_updates(params, upd)
            return s + 1, params, new_bs, opt_state, loss_sum + loss, order

        carry = (
            jnp.int32(0),
            params,
            batch_stats,
            opt.init(params),
            jnp.float32(0.0),
            jnp.zeros((max_len,), jnp.int32),
        )
        _, params, batch_stats, _, loss_sum, _ = jax.lax.while_loop(
            lambda c: c[0] < total, body, carry
        )
        out = dict(variables)
        out["params"] = params
        if "batch_stats" in variables:
            out["batch_stats"] = batch_stats
        return out, loss_sum / jnp.maximum(total, 1).astype(jnp.float32)

    return train
