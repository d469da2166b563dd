"""Krum and Multi-Krum.

* Krum: Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent", NeurIPS 2017.
* Multi-Krum: El Mhamdi, Guerraoui & Rouault, "The Hidden Vulnerability of Distributed Learning in
  Byzantium", ICML 2018, arXiv:1802.07927.

Client ``i``'s score is the sum of squared Euclidean distances to its ``n - f - 2`` nearest
neighbours. Krum keeps the single lowest score; Multi-Krum keeps the ``m`` lowest (default
``m = n - f``, which is what the MARS baselines ran: f = 4 of 20, so Multi-Krum always drops 4,
mars_spec §2.4, Table 2's 25% FPR under 3DFed) and averages them. ``n`` counts the valid rows
only; rows the round dropped are never selected and never serve as neighbours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marsjax.defenses._robust_utils import (
    Layers,
    finish,
    masked_weighted_mean,
    prepare,
    selected_rows,
    sq_distances,
)
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult, EmptyState

__all__ = ["krum", "krum_scores", "multi_krum"]


def krum_scores(sq_dists: jax.Array, valid: jax.Array, num_byzantine: int) -> jax.Array:
    """Krum scores from a ``[N, N]`` squared-distance matrix.

    Args:
      sq_dists: ``[N, N]`` squared distances.
      valid: ``bool[N]`` rows that take part.
      num_byzantine: ``f``.

    Returns:
      ``[N]``: the sum of each valid row's ``n_valid - f - 2`` smallest distances to the other
      valid rows (at least 1, at most ``n_valid - 1`` neighbours); ``inf`` on invalid rows.
    """
    n = sq_dists.shape[0]
    nv = jnp.sum(valid).astype(jnp.int32)
    others = valid[None, :] & ~jnp.eye(n, dtype=bool)
    d = jnp.where(others, sq_dists, jnp.inf)
    d = jnp.sort(d, axis=1)
    k = jnp.clip(nv - num_byzantine - 2, 1, jnp.maximum(nv - 1, 1))
    take = jnp.arange(n)[None, :] < k
    score = jnp.sum(jnp.where(take, d, 0.0), axis=1)
    return jnp.where(valid, score, jnp.inf)


def multi_krum(num_byzantine: int, num_selected: int | None = None, *, layers: Layers = "params"):
    """Multi-Krum: average the ``num_selected`` updates with the lowest Krum scores.

    Args:
      num_byzantine: ``f``, the number of attackers assumed per round.
      num_selected: ``m``; ``None`` keeps ``n_valid - f`` (the paper baselines' setting).
      layers: leaves the distances are computed on (``"params"``, ``"all"``, ``"output"`` or path
        fragments).

    Returns:
      A :class:`~marsjax.defenses.base.Defense`; ``scores`` are the Krum scores.
    """
    f = int(num_byzantine)
    if f < 0:
        raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
    if num_selected is not None and int(num_selected) < 1:
        raise ValueError(f"num_selected must be >= 1, got {num_selected}")

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del key, global_variables, client_ids
        valid, clean, w = prepare(updates, client_weights)
        d = sq_distances(selected_rows(clean, layers))
        score = krum_scores(d, valid, f)
        nv = jnp.sum(valid).astype(jnp.int32)
        m = jnp.maximum(nv - f, 1) if num_selected is None else jnp.int32(num_selected)
        # rank by score, ties broken by index (stable); invalid rows carry +inf.
        rank = jnp.argsort(jnp.argsort(score, stable=True), stable=True)
        accepted = (rank < m) & valid
        accepted, scores = finish(accepted.astype(jnp.float32), score, valid)
        update = masked_weighted_mean(clean, w * accepted)
        return DefenseResult(update, accepted, scores), state

    return Defense(lambda v: EmptyState(), apply)


def krum(num_byzantine: int, *, layers: Layers = "params") -> Defense:
    """Krum: keep only the update with the lowest Krum score (Blanchard et al. 2017)."""
    return multi_krum(num_byzantine, 1, layers=layers)


def _f(ctx: DefenseContext, num_byzantine):
    return ctx.attackers_per_round if num_byzantine is None else num_byzantine


def _build_multikrum(
    ctx: DefenseContext,
    num_byzantine: int | None = None,
    num_selected: int | None = None,
    layers: Layers = "params",
) -> Defense:
    return multi_krum(_f(ctx, num_byzantine), num_selected, layers=layers)


def _build_krum(
    ctx: DefenseContext, num_byzantine: int | None = None, layers: Layers = "params"
) -> Defense:
    return krum(_f(ctx, num_byzantine), layers=layers)
