"""Norm clipping with optional weak differential-privacy noise.

Sun, Kairouz, Suresh & McMahan, "Can You Really Backdoor Federated Learning?", arXiv:1911.07963
(2019). Every update's ``params`` part is scaled to L2 norm at most ``M``, the clipped updates are
averaged, and "weak DP" adds ``N(0, sigma^2)`` to every parameter of the aggregate.

``M`` is fixed (``max_norm``) or, by default, the median norm of this round's valid updates (the
adaptive bound FLAME and DeepSight use). Nobody is rejected: ``accepted`` is 1 on valid rows and
``scores`` is ``norm / M``. BatchNorm running statistics are averaged unclipped.
"""

from __future__ import annotations

import jax.numpy as jnp

from marsjax.defenses._robust_utils import (
    add_param_noise,
    clip_factors,
    finish,
    masked_median,
    masked_weighted_mean,
    prepare,
    row_norms,
    scale_params_rows,
    selected_rows,
)
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult, EmptyState

__all__ = ["norm_clipping"]


def norm_clipping(max_norm: float | None = None, noise_std: float = 0.0) -> Defense:
    """Clip each update to ``max_norm`` (default: the median norm), average, add noise.

    Args:
      max_norm: the clipping bound ``M``; ``None`` uses the median of the valid updates' norms.
      noise_std: standard deviation of the Gaussian noise added to each aggregated parameter
        (0: none; Sun et al. use 0.025 with M = 3 on EMNIST).
    """
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del global_variables, client_ids
        valid, clean, w = prepare(updates, client_weights)
        norms = row_norms(selected_rows(clean, "params"))
        bound = masked_median(norms, valid) if max_norm is None else jnp.float32(max_norm)
        clipped = scale_params_rows(clean, clip_factors(norms, bound))
        update = masked_weighted_mean(clipped, w)
        if noise_std > 0:
            update = add_param_noise(key, update, noise_std)
        scores = norms / jnp.maximum(bound, 1e-30)
        accepted, scores = finish(valid.astype(jnp.float32), scores, valid)
        return DefenseResult(update, accepted, scores), state

    return Defense(lambda v: EmptyState(), apply)


def _build(ctx: DefenseContext, max_norm: float | None = None, noise_std: float = 0.0) -> Defense:
    return norm_clipping(max_norm, noise_std)
