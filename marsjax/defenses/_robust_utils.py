"""Shared pieces of the baseline defenses: masking, layer selection, overflow-safe geometry,
k-means, the gap statistic, PCA, norm clipping and an HDBSCAN host callback.

Conventions used by every baseline defense in this package:

* A row is *valid* when its ``client_weight`` is positive and every entry is finite. Invalid rows
  are zeroed, get ``accepted = 0``, score 0, and never enter another client's statistics (medians,
  distances, clusters are all computed with masks; shapes stay static).
* Distances and similarities are computed from a Gram matrix of the rows scaled by their max-abs
  value, so a finite but huge upload (``1e30``) gives an infinite distance instead of ``inf - inf``
  = NaN, and cosine similarities stay exact for it.
* Norms, clipping and noise act on the ``params`` collection only; BatchNorm running statistics are
  averaged unclipped, as the 3DFed / BackdoorIndicator implementations skip ``running_*`` buffers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from marsjax.tree import row_is_finite, zero_rows
from marsjax.types import PyTree, Updates

__all__ = [
    "Layers",
    "add_param_noise",
    "clip_factors",
    "cosine_similarity",
    "find_output_layer",
    "finish",
    "flat_rows",
    "gap_statistic",
    "hdbscan_labels",
    "kmeans",
    "layer_filter",
    "masked_mean",
    "masked_median",
    "masked_weighted_mean",
    "output_layer_name",
    "path_str",
    "pca",
    "prepare",
    "row_norms",
    "scale_params_rows",
    "scaled_gram",
    "selected_rows",
    "sq_distances",
    "variables_shape",
]

Layers = str | Sequence[str]
_HI = jax.lax.Precision.HIGHEST
_FMAX = float(np.finfo(np.float32).max)


# ------------------------------------------------------------------------------------------------
# Masking


def prepare(updates: Updates, client_weights: jax.Array) -> tuple[jax.Array, Updates, jax.Array]:
    """Valid rows, zero-filled updates and weights (0 on invalid rows).

    Args:
      updates: ``[N, ...]`` stacked client updates.
      client_weights: ``[N]`` FedAvg weights; 0 marks a row dropped by the round.

    Returns:
      ``(valid bool[N], updates with invalid rows zeroed, weights f32[N])``.
    """
    w = jnp.asarray(client_weights, jnp.float32)
    valid = (w > 0) & row_is_finite(updates) & jnp.isfinite(w)
    return valid, zero_rows(updates, valid), jnp.where(valid, w, 0.0)


def finish(accepted: jax.Array, scores: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``accepted`` clipped to ``[0, 1]`` and 0 on invalid rows; finite ``scores`` (0 if invalid)."""
    accepted = jnp.where(valid, jnp.clip(jnp.nan_to_num(accepted), 0.0, 1.0), 0.0)
    scores = jnp.nan_to_num(scores.astype(jnp.float32), nan=_FMAX, posinf=_FMAX, neginf=-_FMAX)
    return accepted.astype(jnp.float32), jnp.where(valid, scores, 0.0)


# ------------------------------------------------------------------------------------------------
# Layer selection


def path_str(path) -> str:
    """``(DictKey('params'), DictKey('fc'), DictKey('kernel'))`` -> ``"params/fc/kernel"``."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return "/".join(parts)


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def find_output_layer(params: PyTree, num_classes: int | None = None) -> str:
    """Name of the output (last fully connected) layer among the top-level modules of ``params``.

    Candidates are top-level modules holding a 2-D ``kernel``. With ``num_classes`` those whose
    output size differs are dropped; the remaining name that sorts last naturally wins
    (``fc2`` over ``fc1``). Works on shapes only, so it can run at trace time.
    """
    cands = []
    for name, sub in params.items():
        if isinstance(sub, dict) or hasattr(sub, "items"):
            k = sub.get("kernel") if hasattr(sub, "get") else None
            if k is not None and len(k.shape) >= 2:
                cands.append((name, k.shape[-1]))
    if num_classes is not None:
        exact = [c for c in cands if c[1] == num_classes]
        cands = exact or cands
    if not cands:
        raise ValueError("no fully connected layer (2-D 'kernel') found for layers='output'")
    return max(cands, key=lambda c: _natural_key(c[0]))[0]


def variables_shape(ctx) -> PyTree:
    """Shapes of the model's variables (``jax.eval_shape`` of ``ctx.model.init``), host-side."""
    x0 = jnp.zeros((1, *ctx.image_shape), jnp.float32)
    return jax.eval_shape(lambda: ctx.model.init(jax.random.key(0), x0))


def output_layer_name(ctx) -> str:
    """The output layer of ``ctx.model`` (matched on ``ctx.num_classes``)."""
    return find_output_layer(variables_shape(ctx)["params"], ctx.num_classes)


def layer_filter(
    tree: PyTree, layers: Layers, output_layer: str | None = None
) -> Callable[[tuple, Any], bool]:
    """A ``(path, leaf) -> bool`` selecting the leaves named by ``layers``.

    ``layers`` is ``"all"`` (params and BN statistics), ``"params"`` (trainable parameters),
    ``"output"`` (kernel and bias of the output layer, ``output_layer`` or auto-detected), or a
    sequence of path fragments matched against ``"params/layer4_1/conv2/kernel"``-style paths.
    """
    if layers == "all":
        return lambda path, leaf: True
    if layers == "params":
        return lambda path, leaf: path_str(path).startswith("params/")
    if layers == "output":
        params = tree.get("params", tree)
        name = output_layer or find_output_layer(params)
        prefix = f"params/{name}/"
        return lambda path, leaf: path_str(path).startswith(prefix)
    if isinstance(layers, str):
        raise TypeError(
            f"layers must be 'all', 'params', 'output' or path fragments, got {layers!r}"
        )
    frags = tuple(layers)
    return lambda path, leaf: any(f in path_str(path) for f in frags)


def selected_rows(
    updates: Updates, layers: Layers = "params", output_layer: str | None = None
) -> list[jax.Array]:
    """The selected leaves of a stacked tree, each reshaped to ``[N, d_leaf]`` (no copy made)."""
    keep = layer_filter(updates, layers, output_layer)
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    rows = [leaf.reshape(leaf.shape[0], -1) for path, leaf in flat if keep(path, leaf)]
    if not rows:
        raise ValueError(f"layers={layers!r} selects no leaf")
    return rows


def flat_rows(updates: Updates, layers: Layers = "params", output_layer: str | None = None):
    """``[N, D]`` concatenation of :func:`selected_rows` (float32)."""
    rows = selected_rows(updates, layers, output_layer)
    return jnp.concatenate([r.astype(jnp.float32) for r in rows], axis=1)


# ------------------------------------------------------------------------------------------------
# Overflow-safe geometry on lists of [N, d] blocks


def _as_blocks(x) -> list[jax.Array]:
    return [x] if isinstance(x, jax.Array | np.ndarray) else list(x)


def _row_scale(blocks) -> jax.Array:
    m = jnp.max(jnp.stack([jnp.max(jnp.abs(b), axis=1) for b in blocks]), axis=0)
    return jnp.where(m > 0, m, 1.0).astype(jnp.float32)


def row_norms(x) -> jax.Array:
    """``[N]`` L2 norms of the rows of ``[N, D]`` (or of a list of blocks), without overflow."""
    blocks = _as_blocks(x)
    s = _row_scale(blocks)
    ss = sum(jnp.sum(jnp.square(b.astype(jnp.float32) / s[:, None]), axis=1) for b in blocks)
    return s * jnp.sqrt(ss)


def scaled_gram(x) -> tuple[jax.Array, jax.Array]:
    """``(G_hat [N, N], s [N])`` with ``G_hat_ij = <x_i / s_i, x_j / s_j>``, ``s_i = max|x_i|``."""
    blocks = _as_blocks(x)
    s = _row_scale(blocks)
    g = 0.0
    for b in blocks:
        bs = b.astype(jnp.float32) / s[:, None]
        g = g + jnp.dot(bs, bs.T, precision=_HI)
    return g, s


def sq_distances(x) -> jax.Array:
    """``[N, N]`` squared Euclidean distances; ``inf`` where they overflow, 0 on the diagonal."""
    g, s = scaled_gram(x)
    sq = jnp.diag(g)
    s2 = jnp.square(s)
    d = (sq * s2)[:, None] + (sq * s2)[None, :] - 2.0 * g * (s[:, None] * s[None, :])
    d = jnp.where(jnp.isnan(d), jnp.inf, jnp.maximum(d, 0.0))
    return jnp.where(jnp.eye(d.shape[0], dtype=bool), 0.0, d)


def cosine_similarity(x, eps: float = 1e-12) -> jax.Array:
    """``[N, N]`` cosine similarities of the rows (0 for an all-zero row), exact for huge rows."""
    g, _ = scaled_gram(x)
    n = jnp.sqrt(jnp.maximum(jnp.diag(g), 0.0))
    return jnp.clip(g / jnp.maximum(n[:, None] * n[None, :], eps), -1.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Masked statistics


def masked_median(x: jax.Array, valid: jax.Array, axis: int = 0) -> jax.Array:
    """Median (numpy convention: mean of the two middle values) over the valid entries of ``axis``.

    ``valid`` is ``bool[x.shape[axis]]``; with no valid entry the result is 0.
    """
    x = jnp.moveaxis(x, axis, 0)
    v = valid.reshape((-1,) + (1,) * (x.ndim - 1))
    s = jnp.sort(jnp.where(v, x, jnp.inf), axis=0)
    n = jnp.sum(valid).astype(jnp.int32)
    lo = jax.lax.dynamic_index_in_dim(s, jnp.maximum((n - 1) // 2, 0), 0, keepdims=False)
    hi = jax.lax.dynamic_index_in_dim(s, jnp.maximum(n // 2, 0), 0, keepdims=False)
    med = lo + (hi - lo) * 0.5  # no overflow for huge finite values
    return jnp.where(n > 0, med, 0.0)


def masked_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of the valid entries of ``x [N]`` (0 when none)."""
    n = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(n, 1)


def clip_factors(norms: jax.Array, bound: jax.Array) -> jax.Array:
    """``min(1, bound / norm)`` per row; 1 for a zero norm, 0 for an infinite one."""
    safe = jnp.where(norms > 0, norms, 1.0)
    f = jnp.where(norms > bound, bound / safe, 1.0)
    return jnp.where(jnp.isfinite(norms), f, 0.0).astype(jnp.float32)


def scale_params_rows(updates: Updates, factors: jax.Array) -> Updates:
    """Multiplies every ``params`` leaf of row ``i`` by ``factors[i]`` (BN statistics unchanged)."""

    def f(path, u):
        if not path_str(path).startswith("params/"):
            return u
        return u * factors.astype(u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))

    return jax.tree_util.tree_map_with_path(f, updates)


def masked_weighted_mean(updates: Updates, weights: jax.Array) -> PyTree:
    """``sum_i w_i u_i / sum_i w_i`` (0 if all weights vanish), as one ``tensordot`` per leaf.

    The rows must be finite (:func:`prepare` zeroes the invalid ones): a row with ``w_i == 0``
    then contributes exactly 0. (``jnp.where`` inside the reduction runs ~50x slower on XLA:CPU.)
    """
    total = jnp.sum(weights)
    inv = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)

    def f(u):
        s = jnp.tensordot(weights.astype(u.dtype), u, axes=(0, 0), precision=_HI)
        return s * inv.astype(u.dtype)

    return jax.tree.map(f, updates)


def add_param_noise(key: jax.Array, update: PyTree, std) -> PyTree:
    """Adds ``N(0, std^2)`` to every ``params`` leaf of an (unstacked) update."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(update)
    keys = jax.random.split(key, len(flat))
    out = []
    for k, (path, leaf) in zip(keys, flat):
        if path_str(path).startswith("params/"):
            leaf = leaf + jnp.asarray(std, leaf.dtype) * jax.random.normal(
                k, leaf.shape, leaf.dtype
            )
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


# ------------------------------------------------------------------------------------------------
# k-means (weighted points, a traced number of active centroids), gap statistic, PCA


def _pairwise_sq(x: jax.Array, c: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x[:, None, :] - c[None, :, :]), axis=-1)


def _kmeans_once(gumbel, x, w, k, k_max: int, iters: int):
    """One k-means++ / Lloyd run; ``gumbel [k_max, n]`` is the seeding's randomness."""
    active = jnp.arange(k_max) < k
    logw = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)
    logw = jnp.where(jnp.any(w > 0), logw, 0.0)
    # k-means++ seeding (probability ~ w * D^2, drawn by Gumbel-max); centroids beyond k inactive.
    cents = jnp.zeros((k_max, x.shape[1]), x.dtype).at[0].set(x[jnp.argmax(logw + gumbel[0])])
    dmin = jnp.sum(jnp.square(x - cents[0]), axis=1)

    def seed(j, carry):
        cents, dmin = carry
        logp = logw + jnp.log(dmin)
        logp = jnp.where(jnp.any(jnp.isfinite(logp)), logp, logw)
        c = x[jnp.argmax(logp + gumbel[j])]
        use = j < k
        cents = jnp.where(use, cents.at[j].set(c), cents)
        dmin = jnp.where(use, jnp.minimum(dmin, jnp.sum(jnp.square(x - c), axis=1)), dmin)
        return cents, dmin

    cents, _ = jax.lax.fori_loop(1, k_max, seed, (cents, dmin))

    def assign(cents):
        d = _pairwise_sq(x, cents)
        d = jnp.where(active[None, :], d, jnp.inf)
        return jnp.argmin(d, axis=1), jnp.min(d, axis=1)

    def step(_, cents):
        lab, _ = assign(cents)
        oh = jax.nn.one_hot(lab, k_max, dtype=x.dtype) * w[:, None]
        cnt = jnp.sum(oh, axis=0)
        new = jnp.dot(oh.T, x, precision=_HI) / jnp.maximum(cnt, 1e-30)[:, None]
        return jnp.where((cnt > 0)[:, None], new, cents)

    cents = jax.lax.fori_loop(0, iters, step, cents)
    lab, dmin = assign(cents)
    inertia = jnp.sum(w * dmin)
    return lab, cents, inertia


def _kmeans_noise(gumbel, x, w, k, k_max: int, iters: int):
    """Best of the restarts ``gumbel [n_init, k_max, n]``."""
    labs, cents, inert = jax.vmap(lambda g: _kmeans_once(g, x, w, k, k_max, iters))(gumbel)
    best = jnp.argmin(inert)
    return labs[best].astype(jnp.int32), cents[best], inert[best]


def kmeans(
    key: jax.Array,
    x: jax.Array,
    weights: jax.Array,
    k,
    *,
    k_max: int | None = None,
    n_init: int = 10,
    iters: int = 50,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted Lloyd k-means with k-means++ seeding, best of ``n_init`` restarts (pure JAX).

    Args:
      key: PRNG key.
      x: ``[n, d]`` points.
      weights: ``[n]`` point weights; 0 removes a point (it is still labelled, by its nearest
        centroid).
      k: number of clusters, a Python int or a traced int ``<= k_max``.
      k_max: static upper bound for a traced ``k`` (default ``k``).
      n_init: restarts; the one with the lowest inertia wins.
      iters: Lloyd iterations per restart.

    Returns:
      ``(labels int32[n], centroids [k_max, d], inertia)``; inertia is
      ``sum_i w_i ||x_i - c(x_i)||^2``.
    """
    k_max = int(k if k_max is None else k_max)
    x = x.astype(jnp.float32)
    w = weights.astype(jnp.float32)
    gumbel = jax.random.gumbel(key, (n_init, k_max, x.shape[0]))
    return _kmeans_noise(gumbel, x, w, k, k_max, iters)


def _box_scale(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shifts the valid points to start at 0 and divides all features by ONE common scale (the
    largest feature range), which leaves the gap statistic unchanged; returns the points and the
    scaled per-feature ranges (the reference box)."""
    v = valid[:, None]
    lo = jnp.min(jnp.where(v, x, jnp.inf), axis=0)
    hi = jnp.max(jnp.where(v, x, -jnp.inf), axis=0)
    rng = jnp.where(jnp.isfinite(hi - lo), hi - lo, 0.0)
    top = jnp.max(rng)
    top = jnp.where(top > 0, top, 1.0)
    lo = jnp.where(jnp.isfinite(lo), lo, 0.0)
    return jnp.where(v, (x - lo) / top, 0.0), rng / top


def gap_statistic(
    key: jax.Array,
    x: jax.Array,
    valid: jax.Array,
    *,
    k_max: int = 10,
    num_refs: int = 5,
    n_init: int = 3,
    iters: int = 30,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Number of clusters by the gap statistic (Tibshirani, Walther & Hastie 2001).

    Reference sets of as many points as there are valid ones are drawn uniformly from the valid
    points' bounding box (the paper's first reference distribution), and
    ``Gap(k) = mean_b log W*_kb - log W_k`` with ``W_k`` the k-means inertia. The estimate is the
    smallest ``k`` with ``Gap(k) >= Gap(k+1) - s_{k+1}``, ``s_k = sd_k sqrt(1 + 1/B)``; ``k`` never
    exceeds the number of valid points.

    Args:
      key: PRNG key.
      x: ``[n, d]`` points.
      valid: ``bool[n]``; invalid points are ignored.
      k_max: largest number of clusters tried (static).
      num_refs: reference sets ``B``.
      n_init, iters: k-means restarts and iterations.

    Returns:
      ``(k int32, gap f32[k_max], s f32[k_max])``.
    """
    n, d = x.shape
    w = valid.astype(jnp.float32)
    xs, box = _box_scale(x.astype(jnp.float32), valid)
    kd, kr = jax.random.split(key)
    refs = jax.random.uniform(kr, (num_refs, n, d)) * box
    data = jnp.concatenate([xs[None], refs], axis=0)  # [1 + B, n, d]
    gumbel = jax.random.gumbel(kd, (k_max, 1 + num_refs, n_init, k_max, n))
    ks = jnp.arange(1, k_max + 1)
    n_valid = jnp.sum(valid).astype(jnp.int32)

    def for_k(k, g):
        inert = jax.vmap(lambda dd, gg: _kmeans_noise(gg, dd, w, k, k_max, iters)[2])(data, g)
        lb = jnp.log(inert[1:] + 1e-12)
        gap = jnp.mean(lb) - jnp.log(inert[0] + 1e-12)
        s = jnp.std(lb) * jnp.sqrt(1.0 + 1.0 / num_refs)
        return gap, s

    gap, s = jax.vmap(for_k)(ks, gumbel)
    nxt_gap = jnp.concatenate([gap[1:], jnp.array([-jnp.inf])])
    nxt_s = jnp.concatenate([s[1:], jnp.array([0.0])])
    ok = (gap >= nxt_gap - nxt_s) | (ks >= n_valid)
    k = jnp.where(jnp.any(ok), ks[jnp.argmax(ok)], k_max)
    k = jnp.clip(k, 1, jnp.maximum(n_valid, 1))
    return k.astype(jnp.int32), gap, s


def pca(x, valid: jax.Array, num_components: int = 2) -> jax.Array:
    """Projects the valid rows onto their top principal components (Gram-matrix PCA).

    Equivalent to ``sklearn.decomposition.PCA(n_components).fit_transform`` on the valid rows (up
    to the sign of each component), computed from the ``[N, N]`` Gram matrix of the centred rows,
    so ``D`` may be millions. ``x`` is ``[N, D]`` or a list of ``[N, d]`` blocks.

    Returns:
      ``[N, num_components]`` scores; invalid rows get 0.
    """
    blocks = _as_blocks(x)
    vf = valid.astype(jnp.float32)
    nv = jnp.maximum(jnp.sum(vf), 1.0)
    g = 0.0
    for b in blocks:
        b = b.astype(jnp.float32)
        mu = jnp.sum(b * vf[:, None], axis=0) / nv
        c = jnp.where(valid[:, None], b - mu, 0.0)
        g = g + jnp.dot(c, c.T, precision=_HI)
    evals, evecs = jnp.linalg.eigh(g)
    evals, evecs = evals[::-1][:num_components], evecs[:, ::-1][:, :num_components]
    # Deterministic sign: the largest-magnitude entry of each component is positive.
    sgn = jnp.sign(evecs[jnp.argmax(jnp.abs(evecs), axis=0), jnp.arange(num_components)])
    scores = evecs * jnp.sqrt(jnp.maximum(evals, 0.0))[None, :] * jnp.where(sgn == 0, 1.0, sgn)
    return jnp.where(valid[:, None], scores, 0.0)


# ------------------------------------------------------------------------------------------------
# HDBSCAN through a host callback (scikit-learn)


def _hdbscan_host(
    data: np.ndarray,
    valid: np.ndarray,
    *,
    min_cluster_size,
    min_samples,
    allow_single_cluster: bool,
    metric: str,
) -> np.ndarray:
    from sklearn.cluster import HDBSCAN

    data = np.asarray(data, np.float64)
    valid = np.asarray(valid, bool)
    n = data.shape[0]
    labels = np.full((n,), -2, np.int32)
    idx = np.flatnonzero(valid)
    m = idx.size
    if m == 0:
        return labels
    if m == 1:
        labels[idx] = 0
        return labels
    sub = data[np.ix_(idx, idx)] if metric == "precomputed" else data[idx]
    finite = np.isfinite(sub)
    big = (np.max(np.abs(sub[finite])) if finite.any() else 1.0) * 10.0 + 1.0
    sub = np.where(finite, sub, big)
    if metric == "precomputed":
        sub = np.maximum((sub + sub.T) / 2.0, 0.0)
        np.fill_diagonal(sub, 0.0)
    mcs = m // 2 + 1 if min_cluster_size == "half" else int(min_cluster_size)
    mcs = int(min(max(mcs, 2), m))
    ms = None if min_samples is None else int(min(max(min_samples, 1), m))
    if np.allclose(sub, sub.flat[0]) if metric != "precomputed" else np.all(sub == 0):
        labels[idx] = 0  # all points identical: one cluster (HDBSCAN is undefined here)
        return labels
    out = HDBSCAN(
        min_cluster_size=mcs,
        min_samples=ms,
        allow_single_cluster=allow_single_cluster,
        metric=metric,
        copy=True,
    ).fit_predict(sub)
    labels[idx] = out.astype(np.int32)
    return labels


def hdbscan_labels(
    data: jax.Array,
    valid: jax.Array,
    *,
    min_cluster_size: int | str = 5,
    min_samples: int | None = None,
    allow_single_cluster: bool = False,
    metric: str = "euclidean",
) -> jax.Array:
    """HDBSCAN cluster labels of the valid rows, via ``jax.pure_callback`` (host, scikit-learn).

    HDBSCAN (Campello et al. 2013) is an inherently sequential, data-dependent host algorithm
    (minimum spanning tree + condensed tree); it runs in :class:`sklearn.cluster.HDBSCAN` on the
    host. The callback uses ``vmap_method="sequential"``, so it also works under ``jax.vmap``.

    Args:
      data: ``[n, d]`` features, or ``[n, n]`` distances with ``metric="precomputed"``.
      valid: ``bool[n]``; only valid rows (and columns) are clustered.
      min_cluster_size: an int, or ``"half"`` for ``n_valid // 2 + 1`` (FLAME).
      min_samples, allow_single_cluster, metric: as in scikit-learn.

    Returns:
      ``int32[n]``: cluster ids ``>= 0``, ``-1`` noise, ``-2`` invalid rows.
    """

    def host(d, v):
        return _hdbscan_host(
            d,
            v,
            min_cluster_size=min_cluster_size,
            min_samples=min_samples,
            allow_single_cluster=allow_single_cluster,
            metric=metric,
        )

    out = jax.ShapeDtypeStruct((data.shape[0],), jnp.int32)
    return jax.pure_callback(host, out, data, valid, vmap_method="sequential")
