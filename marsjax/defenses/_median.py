"""Coordinate-wise median and trimmed mean.

Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018, arXiv:1803.01498.

* ``median``: every coordinate of the aggregate is the median of that coordinate over the valid
  clients (the mean of the two middle values for an even count, as ``numpy.median``).
* ``trimmed_mean``: per coordinate, the ``k`` largest and ``k`` smallest valid values are dropped
  and the rest averaged (``scipy.stats.trim_mean`` with ``proportiontocut = k / n``).

Both act on every leaf, BatchNorm statistics included, and reject nobody: ``accepted`` is 1 for
every valid row, and ``scores`` is each update's L2 distance (``params``) to the aggregate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marsjax.defenses._robust_utils import finish, masked_median, prepare, row_norms, selected_rows
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult, EmptyState

__all__ = ["coordinate_trimmed_mean", "median", "trimmed_mean"]


def _distance_scores(clean, update, valid):
    diff = jax.tree.map(lambda u, a: u - a[None], clean, update)
    return row_norms(selected_rows(diff, "params"))


def median() -> Defense:
    """Coordinate-wise median of the valid updates."""

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del key, global_variables, client_ids
        valid, clean, _ = prepare(updates, client_weights)
        update = jax.tree.map(lambda u: masked_median(u, valid, 0).astype(u.dtype), clean)
        accepted, scores = finish(
            valid.astype(jnp.float32), _distance_scores(clean, update, valid), valid
        )
        return DefenseResult(update, accepted, scores), state

    return Defense(lambda v: EmptyState(), apply)


def coordinate_trimmed_mean(x: jax.Array, valid: jax.Array, k) -> jax.Array:
    """Trimmed mean over axis 0 of ``x [N, ...]``: drop ``k`` smallest and ``k`` largest valid.

    ``k`` is clamped so at least one value remains; with no valid row the result is 0.
    """
    n = x.shape[0]
    v = valid.reshape((-1,) + (1,) * (x.ndim - 1))
    s = jnp.sort(jnp.where(v, x, jnp.inf), axis=0)
    nv = jnp.sum(valid).astype(jnp.int32)
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, jnp.maximum((nv - 1) // 2, 0))
    pos = jnp.arange(n).reshape((-1,) + (1,) * (x.ndim - 1))
    keep = (pos >= k) & (pos < nv - k)
    cnt = jnp.maximum(nv - 2 * k, 1).astype(x.dtype)
    return jnp.sum(jnp.where(keep, s, 0.0), axis=0) / cnt


def trimmed_mean(num_trimmed: int | None = None, trim_ratio: float = 0.1) -> Defense:
    """Coordinate-wise trimmed mean.

    Args:
      num_trimmed: values cut from each end per coordinate (``k``); ``None`` uses
        ``floor(trim_ratio * n_valid)``.
      trim_ratio: fraction cut from each end when ``num_trimmed`` is ``None`` (``[0, 0.5)``).
    """
    if num_trimmed is not None and int(num_trimmed) < 0:
        raise ValueError(f"num_trimmed must be >= 0, got {num_trimmed}")
    if not 0.0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del key, global_variables, client_ids
        valid, clean, _ = prepare(updates, client_weights)
        nv = jnp.sum(valid)
        if num_trimmed is None:
            k = jnp.floor(trim_ratio * nv).astype(jnp.int32)
        else:
            k = int(num_trimmed)
        update = jax.tree.map(lambda u: coordinate_trimmed_mean(u, valid, k).astype(u.dtype), clean)
        accepted, scores = finish(
            valid.astype(jnp.float32), _distance_scores(clean, update, valid), valid
        )
        return DefenseResult(update, accepted, scores), state

    return Defense(lambda v: EmptyState(), apply)


def _build_median(ctx: DefenseContext) -> Defense:
    return median()


def _build_trimmed_mean(
    ctx: DefenseContext, num_trimmed: int | None = None, trim_ratio: float | None = None
) -> Defense:
    """Default: trim ``f = ctx.attackers_per_round`` per side (or ``trim_ratio`` if given)."""
    if num_trimmed is None and trim_ratio is None:
        num_trimmed = ctx.attackers_per_round if ctx.attackers_per_round > 0 else None
    return trimmed_mean(num_trimmed, 0.1 if trim_ratio is None else trim_ratio)
