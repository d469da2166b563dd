"""Krum and Multi-Krum.

* Krum: Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent", NeurIPS 2017.
* Multi-Krum: El Mhamdi, Guerraoui & Rouault, "The Hidden Vulnerability of Distributed Learning in
  Byzantium", ICML 2018, arXiv:1802.07927.

Client ``i``'s score is the sum of its distances to its ``n - f - 2`` nearest neighbours. Krum
keeps the single lowest score; Multi-Krum keeps the ``m`` lowest (default ``m = n - f``, which is
what the MARS baselines ran: f = 4 of 20, so Multi-Krum always drops 4, mars_spec §2.4, Table 2's
25% FPR under 3DFed) and averages them. ``n`` counts the valid rows only; rows the round dropped
(``client_weights == 0`` or a non-finite entry) are never selected, never serve as neighbours and
never take one of the ``m`` places. Ties in the score go to the lower client index.

Two options choose the geometry, independently:

``distance``
  * ``"squared"`` (default): squared Euclidean distances ``||u_i - u_j||^2``, the form of both
    papers above (Krum's score and its resilience proof are stated with squared distances).
  * ``"euclidean"``: unsquared distances ``||u_i - u_j||``, the form of the official MARS code
    (``defenses/__pycache__/krum.cpython-38.pyc`` of github.com/yunming181920/MARS, a 3DFed-derived
    ``Krum`` class): ``compute_euclidean_distance`` returns ``math.sqrt`` of the summed
    ``torch.sum(torch.pow(u1[name] - u2[name], 2))`` over the update's entries. Summing unsquared
    distances weighs a far neighbour less, so the two forms can keep different clients.

``layers``
  * ``"params"`` (default): the trainable parameters only.
  * ``"all"``: every leaf of the update, BatchNorm running statistics included, as in the MARS
    code, whose updates are state-dict differences without only ``num_batches_tracked``
    (``ignored_weights``; marsjax's updates have no such counter).
  * ``"output"`` or path fragments, as elsewhere in the package.

So the MARS baselines' Multi-Krum is ``multikrum`` with ``distance="euclidean", layers="all"``
and its default ``m = n - f`` (``f = 4`` there). Like the papers, the MARS code sums the
``n - f - 2`` nearest distances (a plain slice, so it differs from the clipped count here only
when ``n < f + 3``) and keeps the ``n - f`` lowest scores (a stable sort: ties to the lower
index); its ``Krum`` class adds the selected updates and the server scales the sum by
``fl_eta / fl_total_participants`` (marsjax's ``server_rule="sum"``). The defaults stay the
papers' form, the one marsjax's results so far were computed with, so their numbers do not
change; pass the two options to reproduce the MARS code's selections.
"""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from marsjax.defenses._robust_utils import (
    Layers,
    finish,
    masked_weighted_mean,
    prepare,
    scaled_gram,
    selected_rows,
    sq_distances,
)
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult, EmptyState

__all__ = ["DISTANCES", "euclidean_distances", "krum", "krum_scores", "multi_krum"]

DISTANCES = ("squared", "euclidean")
_LAYER_WORDS = ("all", "params", "output")


def euclidean_distances(x) -> jax.Array:
    """``[N, N]`` Euclidean (unsquared) distances of the rows of ``x`` (``[N, D]`` or blocks).

    Each pair is computed at the scale of its larger row, so a distance is finite whenever it is
    representable even if its square is not (``inf`` only where the distance itself overflows);
    0 on the diagonal.
    """
    g, s = scaled_gram(x)
    sq = jnp.diag(g)
    c = jnp.maximum(s[:, None], s[None, :])
    a = s[:, None] / c
    b = s[None, :] / c
    d2 = sq[:, None] * jnp.square(a) + sq[None, :] * jnp.square(b) - 2.0 * g * (a * b)
    d = c * jnp.sqrt(jnp.maximum(d2, 0.0))
    d = jnp.where(jnp.isnan(d), jnp.inf, d)
    return jnp.where(jnp.eye(d.shape[0], dtype=bool), 0.0, d)


def krum_scores(dists: jax.Array, valid: jax.Array, num_byzantine: int) -> jax.Array:
    """Krum scores from a ``[N, N]`` distance matrix (squared or not: the sum is the same).

    Args:
      dists: ``[N, N]`` pairwise distances.
      valid: ``bool[N]`` rows that take part.
      num_byzantine: ``f``.

    Returns:
      ``[N]``: the sum of each valid row's ``n_valid - f - 2`` smallest distances to the other
      valid rows (at least 1, at most ``n_valid - 1`` neighbours); ``inf`` on invalid rows.
    """
    n = dists.shape[0]
    nv = jnp.sum(valid).astype(jnp.int32)
    others = valid[None, :] & ~jnp.eye(n, dtype=bool)
    d = jnp.where(others, dists, jnp.inf)
    d = jnp.sort(d, axis=1)
    k = jnp.clip(nv - num_byzantine - 2, 1, jnp.maximum(nv - 1, 1))
    take = jnp.arange(n)[None, :] < k
    score = jnp.sum(jnp.where(take, d, 0.0), axis=1)
    return jnp.where(valid, score, jnp.inf)


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    return v


def _check_options(num_byzantine, num_selected, distance, layers) -> None:
    """Raises ``ValueError`` (a bad value) or ``TypeError`` (a bad type) on an option; uses no
    context, so the config validation runs it (``marsjax.config._check_option_values``)."""
    if num_byzantine is not None:
        _check_int("num_byzantine", num_byzantine, 0)
    if num_selected is not None:
        _check_int("num_selected", num_selected, 1)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if isinstance(layers, str):
        if layers not in _LAYER_WORDS:
            raise ValueError(
                f"layers must be one of {_LAYER_WORDS} or a list of path fragments, got {layers!r}"
            )
        return
    if not isinstance(layers, list | tuple) or not all(isinstance(p, str) for p in layers):
        raise TypeError(f"layers must be a string or a list of strings, got {layers!r}")
    if not layers or not all(layers):
        raise ValueError(f"layers must list at least one non-empty path fragment, got {layers!r}")


def multi_krum(
    num_byzantine: int,
    num_selected: int | None = None,
    *,
    layers: Layers = "params",
    distance: str = "squared",
) -> Defense:
    """Multi-Krum: average the ``num_selected`` updates with the lowest Krum scores.

    Args:
      num_byzantine: ``f``, the number of attackers assumed per round.
      num_selected: ``m``; ``None`` keeps ``n_valid - f`` (the paper baselines' setting).
      layers: leaves the distances are computed on (``"params"``, ``"all"``, ``"output"`` or path
        fragments); ``"all"`` includes the BatchNorm statistics, as the MARS code does.
      distance: ``"squared"`` (the Krum papers) or ``"euclidean"`` (the MARS code); see the module
        docstring.

    Returns:
      A :class:`~marsjax.defenses.base.Defense`; ``scores`` are the Krum scores (sums of squared
      or unsquared distances, following ``distance``).
    """
    _check_options(num_byzantine, num_selected, distance, layers)
    f = int(num_byzantine)
    dist_fn = sq_distances if distance == "squared" else euclidean_distances

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del key, global_variables, client_ids
        valid, clean, w = prepare(updates, client_weights)
        d = dist_fn(selected_rows(clean, layers))
        score = krum_scores(d, valid, f)
        n = score.shape[0]
        nv = jnp.sum(valid).astype(jnp.int32)
        m = jnp.maximum(nv - f, 1) if num_selected is None else jnp.int32(num_selected)
        # valid rows first, then by score, then by index; an invalid row never takes a place
        # (even when valid rows score +inf after an overflow).
        order = jnp.lexsort((jnp.arange(n), score, ~valid))
        rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
        accepted = (rank < m) & valid
        accepted, scores = finish(accepted.astype(jnp.float32), score, valid)
        update = masked_weighted_mean(clean, w * accepted)
        return DefenseResult(update, accepted, scores), state

    return Defense(lambda v: EmptyState(), apply)


def krum(num_byzantine: int, *, layers: Layers = "params", distance: str = "squared") -> Defense:
    """Krum: keep only the update with the lowest Krum score (Blanchard et al. 2017)."""
    return multi_krum(num_byzantine, 1, layers=layers, distance=distance)


def _f(ctx: DefenseContext, num_byzantine):
    return ctx.attackers_per_round if num_byzantine is None else num_byzantine


def _build_multikrum(
    ctx: DefenseContext,
    num_byzantine: int | None = None,
    num_selected: int | None = None,
    layers: Layers = "params",
    distance: str = "squared",
) -> Defense:
    _check_options(num_byzantine, num_selected, distance, layers)  # before the context is used
    return multi_krum(_f(ctx, num_byzantine), num_selected, layers=layers, distance=distance)


def _build_krum(
    ctx: DefenseContext,
    num_byzantine: int | None = None,
    layers: Layers = "params",
    distance: str = "squared",
) -> Defense:
    _check_options(num_byzantine, None, distance, layers)  # before the context is used
    return krum(_f(ctx, num_byzantine), layers=layers, distance=distance)
