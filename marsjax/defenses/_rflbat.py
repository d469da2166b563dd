"""RFLBAT: PCA to 2-D, outlier removal, gap-statistic k-means and cosine-based cluster choice.

Wang, Yang, Li et al., "RFLBAT: A Robust Federated Learning Algorithm against Backdoor Attack",
arXiv:2201.03772 (2022). Settings of the MARS baselines (mars_spec §2.4, the 3DFed code):

1. The updates (``layers``) are projected onto their first 2 principal components.
2. ``e_i = sum_j ||p_i - p_j||`` in the 2-D space; clients with ``e_i >= eps1 * median(e)`` are
   dropped (``eps1 = 10``).
3. The number of clusters ``k`` of the rest comes from the gap statistic (``k_max = 10``, 5
   reference sets), then k-means with ``k`` clusters.
4. For every cluster, ``median_i mean_j cos(u_i, u_j)`` over its members (in the original,
   un-projected space; a singleton cluster counts 1); the cluster with the **smallest** value is
   kept (backdoored updates are alike, benign ones diverse).
5. Inside it, ``e_i`` is recomputed over its members and those with ``e_i >= eps2 * median``
   dropped (``eps2 = 4``); the rest are averaged.

PCA, k-means and the gap statistic are pure JAX (:mod:`marsjax.defenses._robust_utils`); k-means
uses k-means++ seeding with ``n_init`` restarts, like scikit-learn's ``KMeans``. The gap statistic
is the textbook one (Tibshirani et al. 2001) on min-max scaled points, where the 3DFed helper sums
unsquared distances to one member per cluster.

``layers="output"`` is the default (the fc layer; the 3DFed code adds ``layer4.1`` convolutions on
ResNet, ``layers=("params/fc/", "layer4_1/conv")``, and all layers on MNIST, ``layers="params"``).
``scores`` is ``e_i / median(e)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marsjax.defenses._robust_utils import (
    Layers,
    cosine_similarity,
    finish,
    gap_statistic,
    kmeans,
    masked_median,
    masked_weighted_mean,
    output_layer_name,
    pca,
    prepare,
    selected_rows,
)
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult, EmptyState

__all__ = ["rflbat"]


def _sum_dist(p: jax.Array, members: jax.Array) -> jax.Array:
    d = jnp.sqrt(jnp.sum(jnp.square(p[:, None, :] - p[None, :, :]), axis=-1))
    return jnp.sum(jnp.where(members[None, :], d, 0.0), axis=1)


def rflbat(
    *,
    layers: Layers = "output",
    eps1: float = 10.0,
    eps2: float = 4.0,
    k_max: int = 10,
    num_refs: int = 5,
    n_init: int = 10,
    output_layer: str | None = None,
) -> Defense:
    """RFLBAT.

    Args:
      layers: the leaves that are projected (see the module docstring).
      eps1, eps2: the two outlier thresholds (multiples of the median summed distance).
      k_max: largest number of clusters the gap statistic tries.
      num_refs: reference sets of the gap statistic.
      n_init: k-means restarts.
      output_layer: name of the output layer (auto-detected if ``None``).
    """

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del global_variables, client_ids
        valid, clean, w = prepare(updates, client_weights)
        n = w.shape[0]
        km = min(k_max, n)
        rows = selected_rows(clean, layers, output_layer)
        p = pca(rows, valid, 2)
        e = _sum_dist(p, valid)
        med = masked_median(e, valid)
        keep1 = valid & (e < eps1 * med)
        keep1 = jnp.where(jnp.any(keep1), keep1, valid)  # all equal (median 0): keep everyone
        k_gap, k_km = jax.random.split(key)
        k, _, _ = gap_statistic(k_gap, p, keep1, k_max=km, num_refs=num_refs)
        labels, _, _ = kmeans(k_km, p, keep1.astype(jnp.float32), k, k_max=km, n_init=n_init)
        cos = cosine_similarity(rows)

        def cluster_value(c):
            m = keep1 & (labels == c)
            cnt = jnp.sum(m)
            avg = jnp.sum(jnp.where(m[None, :], cos, 0.0), axis=1) / jnp.maximum(cnt, 1)
            v = jnp.where(cnt <= 1, 1.0, masked_median(avg, m))
            return jnp.where((cnt == 0) | (c >= k), jnp.inf, v)

        vals = jax.vmap(cluster_value)(jnp.arange(km))
        best = jnp.argmin(vals)
        keep2 = keep1 & (labels == best)
        e2 = _sum_dist(p, keep2)
        keep3 = keep2 & (e2 < eps2 * masked_median(e2, keep2))
        keep3 = jnp.where(jnp.any(keep3), keep3, keep2)
        update = masked_weighted_mean(clean, w * keep3)
        accepted, scores = finish(keep3.astype(jnp.float32), e / jnp.maximum(med, 1e-30), valid)
        return DefenseResult(update, accepted, scores), state

    return Defense(lambda v: EmptyState(), apply)


def _build(
    ctx: DefenseContext,
    layers: Layers = "output",
    eps1: float = 10.0,
    eps2: float = 4.0,
    k_max: int = 10,
    num_refs: int = 5,
    n_init: int = 10,
    output_layer: str | None = None,
) -> Defense:
    if output_layer is None and layers == "output":
        output_layer = output_layer_name(ctx)
    return rflbat(
        layers=layers,
        eps1=eps1,
        eps2=eps2,
        k_max=k_max,
        num_refs=num_refs,
        n_init=n_init,
        output_layer=output_layer,
    )
