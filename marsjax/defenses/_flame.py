"""FLAME: HDBSCAN filtering, adaptive norm clipping and Gaussian noise.

Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022,
arXiv:2101.02281. Settings of the MARS baselines (mars_spec §2.4, from the 3DFed code):

1. Pairwise cosine distances between the clients' **local models** (global + update) restricted to
   the **output layer** (``layers="output"``; ``layers="params"`` is the paper's whole model).
2. HDBSCAN on the precomputed distances with ``min_cluster_size = n // 2 + 1``, ``min_samples = 1``
   and ``allow_single_cluster=True``; every clustered (non-noise) model is accepted.
3. Each accepted update is clipped to ``S_t``, the median L2 norm of all the round's updates.
4. The mean of the clipped updates gets ``N(0, (lamda * S_t)^2)`` noise on every parameter
   (``lamda = 0.001``).

HDBSCAN runs on the host in :class:`sklearn.cluster.HDBSCAN` through ``jax.pure_callback``
(:func:`~marsjax.defenses._robust_utils.hdbscan_labels`); everything else is JAX.

Deviation: the 3DFed code adds the noise to the *sum* of accepted updates before the server's
``eta / N`` step; here it is added to the mean update, as in the FLAME paper. ``scores`` is each
client's median cosine distance to the other valid clients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marsjax.defenses._robust_utils import (
    Layers,
    add_param_noise,
    clip_factors,
    cosine_similarity,
    finish,
    hdbscan_labels,
    masked_median,
    masked_weighted_mean,
    output_layer_name,
    prepare,
    row_norms,
    scale_params_rows,
    selected_rows,
)
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult, EmptyState

__all__ = ["feature_rows", "flame"]


def feature_rows(
    clean, global_variables, layers: Layers, on: str, output_layer: str | None = None
) -> list[jax.Array]:
    """Selected ``[N, d]`` blocks of the updates (``on="updates"``) or of the local models
    (``on="models"``: global + update)."""
    rows = selected_rows(clean, layers, output_layer)
    if on == "updates":
        return rows
    if on != "models":
        raise ValueError(f"on must be 'models' or 'updates', got {on!r}")
    g = jax.tree.map(lambda x: x[None], global_variables)
    g_rows = selected_rows(g, layers, output_layer)
    return [r + gr.astype(r.dtype) for r, gr in zip(rows, g_rows)]


def flame(
    *,
    layers: Layers = "output",
    on: str = "models",
    lamda: float = 0.001,
    min_cluster_size: int | str = "half",
    min_samples: int = 1,
    output_layer: str | None = None,
) -> Defense:
    """FLAME.

    Args:
      layers: leaves the cosine distances use: ``"output"`` (3DFed/MARS baselines), ``"params"``
        (the FLAME paper), ``"all"`` or path fragments.
      on: ``"models"`` (local models, FLAME and 3DFed) or ``"updates"``.
      lamda: noise level; ``sigma = lamda * S_t`` (0 disables the noise).
      min_cluster_size: HDBSCAN's; ``"half"`` = ``n_valid // 2 + 1``.
      min_samples: HDBSCAN's.
      output_layer: name of the output layer (auto-detected if ``None``).
    """
    if lamda < 0:
        raise ValueError(f"lamda must be >= 0, got {lamda}")

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del client_ids
        valid, clean, w = prepare(updates, client_weights)
        feats = feature_rows(clean, global_variables, layers, on, output_layer)
        cd = 1.0 - cosine_similarity(feats)
        labels = hdbscan_labels(
            cd,
            valid,
            min_cluster_size=min_cluster_size,
            min_samples=min_samples,
            allow_single_cluster=True,
            metric="precomputed",
        )
        accepted = (labels >= 0) & valid
        norms = row_norms(selected_rows(clean, "params"))
        st = masked_median(norms, valid)
        clipped = scale_params_rows(clean, clip_factors(norms, st))
        update = masked_weighted_mean(clipped, w * accepted)
        if lamda > 0:
            update = add_param_noise(key, update, lamda * st)
        n = cd.shape[0]
        others = valid[None, :] & ~jnp.eye(n, dtype=bool)
        score = jax.vmap(masked_median)(cd, others)
        accepted, scores = finish(accepted.astype(jnp.float32), score, valid)
        return DefenseResult(update, accepted, scores), state

    return Defense(lambda v: EmptyState(), apply)


def _build(
    ctx: DefenseContext,
    layers: Layers = "output",
    on: str = "models",
    lamda: float = 0.001,
    min_cluster_size: int | str = "half",
    min_samples: int = 1,
    output_layer: str | None = None,
) -> Defense:
    if output_layer is None and layers == "output":
        output_layer = output_layer_name(ctx)
    return flame(
        layers=layers,
        on=on,
        lamda=lamda,
        min_cluster_size=min_cluster_size,
        min_samples=min_samples,
        output_layer=output_layer,
    )
