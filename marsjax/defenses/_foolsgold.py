"""FoolsGold: down-weighting clients whose update histories look alike (sybils).

Fung, Yoon & Beschastnikh, "The Limitations of Federated Learning in Sybil Settings", RAID 2020,
arXiv:1808.04866 (Algorithm 1). Settings of the MARS baselines (mars_spec §2.4, 3DFed code):
features are the clients' **summed update histories** restricted to the **output layer**.

Per round, for the clients of the round with histories ``H_i``:

1. ``cs = cos(H_i, H_j)`` with the diagonal set to 0; ``v_i = max_j cs_ij``.
2. Pardoning: ``cs_ij *= v_i / v_j`` whenever ``v_i < v_j``.
3. ``wv_i = clip(1 - max_j cs_ij, 0, 1)``, rescaled so that the largest is 1, with 1 -> 0.99.
4. Logit: ``wv_i = clip(confidence * (ln(wv_i / (1 - wv_i) + eps) + 0.5), 0, 1)``.

``accepted`` is ``wv`` itself (soft weights: a client counts as flagged when ``wv <= 0.5``, the
paper's rule, mars_spec §2.1); the aggregate is the ``wv``-weighted mean, so the official
``sum_i wv_i * delta_i`` is recovered by the ``sum`` server rule. ``scores`` is ``v_i`` (before
pardoning).

History needs client identities across rounds: ``apply`` takes ``client_ids`` (``int32 [N]``, the
simulator passes the round's sampled ids) and keeps ``H`` as ``[num_clients, D]`` in the state,
indexed by id: a client's history follows it whatever row it lands in. ``apply`` refuses to run
without ids (rows are shuffled every round, so a row index is not a client). As in the 3DFed
code, ``H_i`` is the sum of client ``i``'s updates over the rounds it took part in, this round's
included; the similarities are computed among the round's clients (3DFed lets every client take
part in every round, where the two coincide). The
optional importance weighting of output-layer features from the paper is not implemented (the
3DFed/MARS baselines do not use it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from marsjax.defenses._robust_utils import (
    Layers,
    cosine_similarity,
    finish,
    flat_rows,
    layer_filter,
    masked_weighted_mean,
    output_layer_name,
    prepare,
)
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult

__all__ = ["FoolsGoldState", "foolsgold", "foolsgold_weights"]


class FoolsGoldState(NamedTuple):
    """``history``: ``[num_clients, D]`` summed updates (selected layers) per client id."""

    history: jax.Array


def foolsgold_weights(
    features: jax.Array,
    valid: jax.Array,
    *,
    confidence: float = 1.0,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, jax.Array]:
    """FoolsGold's weights for the rows of ``features [N, D]`` (invalid rows get 0 and are ignored).

    Returns:
      ``(wv f32[N] in [0, 1], max_similarity f32[N])``.
    """
    n = features.shape[0]
    eye = jnp.eye(n, dtype=bool)
    cs = jnp.where(eye, 0.0, cosine_similarity(features))
    cols = valid[None, :] | eye
    cs = jnp.where(cols, cs, -jnp.inf)
    maxcs = jnp.max(cs, axis=1) + epsilon
    pardon = (maxcs[:, None] < maxcs[None, :]) & ~eye
    cs = jnp.where(pardon, cs * maxcs[:, None] / maxcs[None, :], cs)
    wv = jnp.clip(1.0 - jnp.max(cs, axis=1), 0.0, 1.0)
    wv = jnp.where(valid, wv, 0.0)
    top = jnp.max(wv)
    wv = jnp.where(top > 0, wv / jnp.where(top > 0, top, 1.0), 0.0)
    wv = jnp.where(wv == 1.0, 0.99, wv)
    logit = confidence * (jnp.log(wv / (1.0 - wv) + epsilon) + 0.5)
    wv = jnp.clip(jnp.where(jnp.isposinf(logit), 1.0, logit), 0.0, 1.0)
    return jnp.where(valid, wv, 0.0), jnp.where(valid, maxcs - epsilon, 0.0)


def _dim(global_variables, layers, output_layer) -> int:
    keep = layer_filter(jax.tree.map(lambda x: x[None], global_variables), layers, output_layer)
    flat = jax.tree_util.tree_flatten_with_path(global_variables)[0]
    return sum(int(x.size) for p, x in flat if keep(p, x[None]))


def foolsgold(
    num_clients: int,
    *,
    layers: Layers = "output",
    confidence: float = 1.0,
    epsilon: float = 1e-5,
    output_layer: str | None = None,
) -> Defense:
    """FoolsGold.

    Args:
      num_clients: size of the federation (rows of the history).
      layers: history features: ``"output"`` (3DFed/MARS baselines), ``"params"``, ``"all"`` or
        path fragments.
      confidence: the logit's ``kappa``.
      epsilon: the 3DFed code's ``1e-5`` (added to ``v`` and inside the log).
      output_layer: name of the output layer (auto-detected if ``None``).
    """

    def init(global_variables):
        d = _dim(global_variables, layers, output_layer)
        return FoolsGoldState(jnp.zeros((num_clients, d), jnp.float32))

    def apply(key, updates, state, *, global_variables, client_weights, client_ids):
        del key, global_variables
        if client_ids is None:
            raise ValueError(
                "foolsgold keeps a history per client: apply(..., client_ids=int32 [N]) is "
                "required (the round's rows are shuffled, a row index is not a client)"
            )
        valid, clean, w = prepare(updates, client_weights)
        feats = flat_rows(clean, layers, output_layer)
        ids = jnp.asarray(client_ids, jnp.int32)
        hist = state.history.at[ids].add(jnp.where(valid[:, None], feats, 0.0))
        cur = hist[ids]
        wv, maxcs = foolsgold_weights(cur, valid, confidence=confidence, epsilon=epsilon)
        update = masked_weighted_mean(clean, w * wv)
        accepted, scores = finish(wv, maxcs, valid)
        return DefenseResult(update, accepted, scores), FoolsGoldState(hist)

    return Defense(init, apply)


def _build(
    ctx: DefenseContext,
    layers: Layers = "output",
    confidence: float = 1.0,
    epsilon: float = 1e-5,
    output_layer: str | None = None,
) -> Defense:
    if output_layer is None and layers == "output":
        output_layer = output_layer_name(ctx)
    return foolsgold(
        ctx.num_clients,
        layers=layers,
        confidence=confidence,
        epsilon=epsilon,
        output_layer=output_layer,
    )
