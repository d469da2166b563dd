"""FLTrust: trust bootstrapping from a small clean root dataset held by the server.

Cao, Fang, Liu & Gong, "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021, arXiv:2012.13995.

Every round the server trains the global model on its root data exactly as a client would (same
local SGD), giving the server update ``g0``. Client ``i`` gets the trust score
``TS_i = ReLU(cos(g_i, g0))``, its update is rescaled to ``||g0||``, and the aggregate is
``sum_i TS_i * (||g0|| / ||g_i||) g_i / sum_i TS_i``.

Cosines and norms use the ``params`` leaves; BatchNorm running statistics are averaged with the
trust weights without rescaling. ``accepted`` is ``TS_i > 0`` (a client with a non-positive cosine
gets weight 0); ``scores`` is ``1 - cos(g_i, g0)``.

The root data comes from ``DefenseContext.server_data`` (``x`` uint8 ``[n, H, W, C]``, ``y`` int32
``[n]``; the paper uses 100 samples). The server's local training is the clients' (``DefenseContext.train``,
filled by the simulator from the experiment's ``train`` section, as the paper trains the server
like a client); each of its fields can be overridden by the option of the same name.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from marsjax.client import make_local_train
from marsjax.defenses._robust_utils import (
    cosine_similarity,
    finish,
    masked_weighted_mean,
    prepare,
    row_norms,
    scale_params_rows,
    selected_rows,
)
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult, EmptyState

__all__ = ["fltrust", "server_update_fn", "trust_scores"]


class _Root:
    def __init__(self, x, y):
        self.x, self.y = x, y


def trust_scores(client_rows, server_rows) -> tuple[jax.Array, jax.Array]:
    """``(ReLU(cos(g_i, g0)) [N], cos [N])`` from ``[N, d]`` client blocks and ``[d]`` server blocks."""
    stacked = [
        jnp.concatenate([c, s[None].astype(c.dtype)], 0) for c, s in zip(client_rows, server_rows)
    ]
    cos = cosine_similarity(stacked)[-1, :-1]
    return jnp.maximum(cos, 0.0), cos


def server_update_fn(
    model: Any,
    normalize,
    root_x,
    root_y,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    local_epochs: int = 2,
    local_steps: int | None = None,
):
    """``(key, global_variables) -> g0``: the server's update from local training on its root
    data ``(root_x uint8 [n, H, W, C], root_y int32 [n])``, with :func:`marsjax.client.make_local_train`."""
    root_x = jnp.asarray(np.asarray(root_x), jnp.uint8)
    root_y = jnp.asarray(np.asarray(root_y), jnp.int32)
    n = int(root_x.shape[0])
    if n < 1:
        raise ValueError("FLTrust needs at least one root sample")
    train = make_local_train(
        model,
        normalize,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=min(batch_size, n),
        epochs=local_epochs,
        steps=local_steps,
    )
    root = _Root(root_x, root_y)
    idx = jnp.arange(n, dtype=jnp.int32)

    def server_update(key, global_variables):
        trained, _ = train(global_variables, key, root, idx, jnp.int32(n))
        return jax.tree.map(lambda a, b: a - b, trained, global_variables)

    return server_update


def fltrust(
    model: Any,
    normalize,
    root_x,
    root_y,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    batch_size: int = 64,
    local_epochs: int = 2,
    local_steps: int | None = None,
) -> Defense:
    """FLTrust with the root data ``(root_x uint8 [n, H, W, C], root_y int32 [n])``.

    Args:
      model: the flax module the clients train.
      normalize: uint8 -> model input.
      root_x, root_y: the server's clean root dataset.
      lr, momentum, weight_decay, batch_size, local_epochs, local_steps: the server's local
        training (use the clients' settings, as the paper does).
    """
    server_update = server_update_fn(
        model,
        normalize,
        root_x,
        root_y,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        local_epochs=local_epochs,
        local_steps=local_steps,
    )

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del client_ids
        valid, clean, w = prepare(updates, client_weights)
        g0 = server_update(key, global_variables)
        g0_stacked = jax.tree.map(lambda x: x[None], g0)
        crow = selected_rows(clean, "params")
        srow = [r[0] for r in selected_rows(g0_stacked, "params")]
        ts, cos = trust_scores(crow, srow)
        ts = jnp.where(valid, ts, 0.0)
        n0 = row_norms([r[None] for r in srow])[0]
        ni = row_norms(crow)
        factor = jnp.where(ni > 0, n0 / jnp.where(ni > 0, ni, 1.0), 0.0)
        rescaled = scale_params_rows(clean, factor)
        update = masked_weighted_mean(rescaled, ts * w)
        accepted, scores = finish((ts > 0).astype(jnp.float32), 1.0 - cos, valid)
        return DefenseResult(update, accepted, scores), state

    return Defense(lambda v: EmptyState(), apply)


def _build(
    ctx: DefenseContext,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    batch_size: int | None = None,
    local_epochs: int | None = None,
    local_steps: int | None = None,
) -> Defense:
    if ctx.server_data is None:
        raise ValueError(
            "fltrust needs root data: DefenseContext.server_data = (x uint8 [n, H, W, C], "
            "y int32 [n]) (the paper uses 100 clean samples)"
        )
    t = ctx.train

    def pick(value, name):
        return getattr(t, name) if value is None else value

    x, y = ctx.server_data
    return fltrust(
        ctx.model,
        ctx.normalize,
        x,
        y,
        lr=pick(lr, "lr"),
        momentum=pick(momentum, "momentum"),
        weight_decay=pick(weight_decay, "weight_decay"),
        batch_size=pick(batch_size, "batch_size"),
        local_epochs=pick(local_epochs, "local_epochs"),
        local_steps=pick(local_steps, "local_steps"),
    )
