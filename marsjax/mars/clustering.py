"""K-means for MARS's "K-WMeans" step, in pure JAX with static shapes.

MARS (Wan et al., NeurIPS 2025, arXiv:2509.20383, §4.3) splits the clients into two clusters by the
Wasserstein distance between their CBE vectors. The paper's text and the official code disagree on
what that means (mars_spec §1.5, §6.1), so both are here:

* ``rule="code"`` (default, what produced the paper's tables): the pairwise W1 matrix ``D`` is
  computed and each client is represented by its ROW of ``D``; plain Euclidean k-means runs on those
  rows, as ``sklearn.cluster.KMeans(n_clusters=2, random_state=0)`` with sklearn's defaults
  (k-means++ with ``2 + floor(ln k)`` local trials, ``n_init=10``, ``max_iter=300``, ``tol=1e-4``
  relative to the mean feature variance, Lloyd iterations, best run by inertia). :func:`kmeans`
  follows sklearn's Lloyd loop step for step (strict convergence when labels repeat, else stop when
  the squared center shift is at most the tolerance, then one last assignment); only the random
  streams differ, so results agree with sklearn's up to a label swap whenever both reach the same
  local optimum (the tests measure how often on random data).
* ``rule="paper"``: k-means whose metric is W1 itself (:func:`wasserstein_kmeans`): assign each
  client to the nearest centroid by W1, centroid = elementwise mean of the members' CBE vectors
  (Algorithm 1's center) or, with ``centroid="barycenter"``, the mean of the members' SORTED vectors
  (the 1-D Wasserstein barycenter). Inertia is the sum of squared W1 distances; k-means++ uses W1
  for its D^2 sampling.

Weights: a row with weight 0 takes no part (it is never an initial center, does not move centroids,
does not count in the inertia or in the tolerance) but still receives a label. The MARS defense
gives weight 0 to dropped and non-finite clients, and zeroes their columns of ``D``, which makes the
code rule equivalent to clustering the remaining clients alone.

Why not ``ott.tools.k_means``: ott-jax 0.6.0's k-means++ draws its first center uniformly and its
D^2 sampling ignores the point weights, so a weight-0 (rejected) client can become a center, and its
``tol`` is absolute. The loop here is as short and follows sklearn's semantics. Speed (case
``kmeans_impl`` of ``benchmarks/bench_mars.py``, 2-core CPU): 0.2 ms for 20 clients and a few ms
for 1000 (rows of a 1000 x 1000 W1 matrix), against about 1 s for sklearn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from marsjax.mars.wasserstein import wasserstein_matrix, wasserstein_to_rows
from marsjax.types import Key

__all__ = ["KMeansResult", "k_wmeans", "kmeans", "wasserstein_kmeans"]

DistFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x [N, D], centers [K, D]) -> [N, K]
CentersFn = Callable[
    [jax.Array, jax.Array], jax.Array
]  # (x [N, D], member weights [N, K]) -> [K, D]


class KMeansResult(NamedTuple):
    """The best of ``n_init`` k-means runs.

    Attributes:
      labels: ``[N]`` int32 cluster of every row (rows of weight 0 included).
      centers: ``[k, D]`` float32 centroids.
      inertia: scalar, weighted sum of squared distances to the own centroid.
      num_iterations: Lloyd iterations of the best run.
      converged: whether the best run stopped before ``max_iter``.
    """

    labels: jax.Array
    centers: jax.Array
    inertia: jax.Array
    num_iterations: jax.Array
    converged: jax.Array


def _sq_euclidean(x: jax.Array, centers: jax.Array) -> jax.Array:
    """``||x_i - c_j||^2`` as ``|x|^2 - 2 x.c + |c|^2`` (one matrix product, as sklearn computes it;
    20x faster than the broadcast difference for 1000 x 1000 rows)."""
    xx = jnp.sum(x * x, axis=1)[:, None]
    cc = jnp.sum(centers * centers, axis=1)[None, :]
    xc = jnp.dot(x, centers.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(xx - 2.0 * xc + cc, 0.0)


def _weighted_means(x: jax.Array, member: jax.Array) -> jax.Array:
    """``member`` ``[N, K]`` (weight of row i in cluster j) -> ``[K, D]`` weighted means."""
    total = jnp.sum(member, axis=0)
    sums = jnp.einsum("nk,nd->kd", member, x, precision=jax.lax.Precision.HIGHEST)
    return sums / jnp.where(total > 0, total, 1.0)[:, None]


def _kmeans_plus_plus(
    key: Key, x: jax.Array, w: jax.Array, k: int, n_local_trials: int, dist_fn: DistFn
) -> jax.Array:
    """Greedy k-means++ (sklearn's variant): indices ``[k]`` of the initial centers."""
    n = x.shape[0]

    def draw(sub: Key, mass: jax.Array, num: int) -> jax.Array:
        # Inverse-CDF sampling of ``num`` rows with probability proportional to ``mass``
        # (searchsorted side="right" written as a comparison count: a weight-0 row adds nothing to
        # the cumulative sum and is never drawn; all-zero mass draws row n - 1).
        cum = jnp.cumsum(mass)
        r = jax.random.uniform(sub, (num,)) * cum[-1]
        return jnp.minimum(jnp.sum(cum[None, :] <= r[:, None], axis=1), n - 1)

    key, sub = jax.random.split(key)
    first = draw(sub, jnp.where(jnp.sum(w) > 0, w, 1.0), 1)[0]
    closest = dist_fn(x, x[first][None])[:, 0]
    idx = [first]
    for _ in range(1, k):
        key, sub = jax.random.split(key)
        cand = draw(sub, w * closest, n_local_trials)
        d_cand = jnp.minimum(closest[None, :], dist_fn(x, x[cand]).T)  # [T, N]
        pots = jnp.sum(w[None, :] * d_cand, axis=1)
        best = jnp.argmin(pots)
        closest = d_cand[best]
        idx.append(cand[best])
    return jnp.stack(idx)


def _lloyd(
    x: jax.Array,
    w: jax.Array,
    centers: jax.Array,
    *,
    max_iter: int,
    tol_abs: jax.Array,
    dist_fn: DistFn,
    centers_fn: CentersFn,
) -> KMeansResult:
    """sklearn's ``_kmeans_single_lloyd`` loop, with empty clusters moved to the farthest row."""
    n, k = x.shape[0], centers.shape[0]
    active = w > 0

    def assign(c):
        d = dist_fn(x, c)
        return jnp.argmin(d, axis=1).astype(jnp.int32), d

    def cond(state):
        _, _, _, it, done = state
        return (it < max_iter) & ~done

    def body(state):
        c, labels_old, _, it, _ = state
        labels, d = assign(c)
        onehot = (labels[:, None] == jnp.arange(k)[None, :]) * w[:, None]
        new = centers_fn(x, onehot)
        size = jnp.sum(onehot, axis=0)
        dmin = jnp.take_along_axis(d, labels[:, None], axis=1)[:, 0]
        far = jnp.argmax(jnp.where(active, dmin, -jnp.inf))
        new = jnp.where((size > 0)[:, None], new, x[far][None, :])
        strict = jnp.all(jnp.where(active, labels == labels_old, True))
        shift = jnp.sum(jnp.square(new - c))
        return new, labels, strict, it + 1, strict | (shift <= tol_abs)

    init = (
        centers,
        jnp.full((n,), -1, jnp.int32),
        jnp.array(False),
        jnp.array(0),
        jnp.array(False),
    )
    c, labels, strict, it, done = jax.lax.while_loop(cond, body, init)
    final_labels, d = assign(c)
    labels = jnp.where(strict, labels, final_labels)
    dmin = jnp.take_along_axis(d, labels[:, None], axis=1)[:, 0]
    inertia = jnp.sum(jnp.where(active, w * dmin, 0.0))
    return KMeansResult(labels, c, inertia, it, done)


def _tolerance(x: jax.Array, w: jax.Array, tol: float, num_features: jax.Array | None) -> jax.Array:
    """sklearn's ``tol * mean(var(X, axis=0))`` over the rows of positive weight (unweighted)."""
    active = (w > 0).astype(x.dtype)
    count = jnp.maximum(jnp.sum(active), 1.0)
    mean = jnp.sum(active[:, None] * x, axis=0) / count
    var = jnp.sum(active[:, None] * jnp.square(x - mean), axis=0) / count
    denom = x.shape[1] if num_features is None else jnp.maximum(num_features, 1)
    return tol * jnp.sum(var) / denom


def _best_of(
    key: Key,
    x: jax.Array,
    w: jax.Array,
    *,
    num_clusters: int,
    n_init: int,
    max_iter: int,
    tol_abs: jax.Array,
    dist_fn: DistFn,
    centers_fn: CentersFn,
) -> KMeansResult:
    n_local_trials = 2 + int(math.log(num_clusters))

    def run(k: Key) -> KMeansResult:
        idx = _kmeans_plus_plus(k, x, w, num_clusters, n_local_trials, dist_fn)
        return _lloyd(
            x,
            w,
            x[idx],
            max_iter=max_iter,
            tol_abs=tol_abs,
            dist_fn=dist_fn,
            centers_fn=centers_fn,
        )

    runs = jax.vmap(run)(jax.random.split(key, n_init))
    best = jnp.argmin(runs.inertia)  # first minimum, as sklearn keeps the earlier run on ties
    return jax.tree.map(lambda a: a[best], runs)


def _check(
    x: jax.Array, weights: jax.Array | None, num_clusters: int
) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 2:
        raise ValueError(f"expected [N, D] rows, got shape {x.shape}")
    if not 1 <= num_clusters <= x.shape[0]:
        raise ValueError(f"num_clusters={num_clusters} must be in [1, N={x.shape[0]}]")
    x = x.astype(jnp.float32)
    w = jnp.ones(x.shape[0], jnp.float32) if weights is None else weights.astype(jnp.float32)
    return x, w


def kmeans(
    key: Key,
    x: jax.Array,
    weights: jax.Array | None = None,
    *,
    num_clusters: int = 2,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    num_features: jax.Array | None = None,
) -> KMeansResult:
    """Euclidean k-means with sklearn's semantics (k-means++, ``n_init`` restarts, Lloyd).

    Args:
      key: PRNG key (the restarts use ``jax.random.split(key, n_init)``).
      x: ``[N, D]`` rows.
      weights: ``[N]`` nonnegative row weights (sklearn's ``sample_weight``); 0 excludes a row.
      num_clusters: k (static).
      n_init: restarts (static); the run of least inertia wins.
      max_iter: Lloyd iteration cap (static).
      tol: relative tolerance; the loop stops when the total squared center shift is at most
        ``tol * mean_d var(x[:, d])`` (variance over the rows of positive weight).
      num_features: divide the summed variance by this instead of ``D`` (the defense passes the
        number of valid clients, whose columns are the only non-constant ones).

    Returns:
      :class:`KMeansResult`.
    """
    x, w = _check(x, weights, num_clusters)
    return _best_of(
        key,
        x,
        w,
        num_clusters=num_clusters,
        n_init=n_init,
        max_iter=max_iter,
        tol_abs=_tolerance(x, w, tol, num_features),
        dist_fn=_sq_euclidean,
        centers_fn=_weighted_means,
    )


def wasserstein_kmeans(
    key: Key,
    x: jax.Array,
    weights: jax.Array | None = None,
    *,
    num_clusters: int = 2,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    centroid: Literal["mean", "barycenter"] = "mean",
) -> KMeansResult:
    """K-means whose metric is the 1-D W1 distance between rows (the paper's K-WMeans text).

    Args:
      key: PRNG key.
      x: ``[N, M]`` CBE vectors.
      weights: ``[N]`` row weights; 0 excludes a row.
      num_clusters: k (static).
      n_init: restarts (static).
      max_iter: iteration cap (static).
      tol: as in :func:`kmeans` (on the centroid vectors).
      centroid: ``"mean"``: elementwise mean of the members' vectors (Algorithm 1);
        ``"barycenter"``: mean of the members' sorted vectors.

    Returns:
      :class:`KMeansResult`; ``inertia`` sums squared W1 distances.
    """
    x, w = _check(x, weights, num_clusters)
    if centroid == "mean":
        centers_fn = _weighted_means
    elif centroid == "barycenter":

        def centers_fn(v: jax.Array, member: jax.Array) -> jax.Array:
            return _weighted_means(jnp.sort(v, axis=-1), member)
    else:
        raise ValueError(f"centroid must be 'mean' or 'barycenter', got {centroid!r}")

    def dist_fn(v: jax.Array, c: jax.Array) -> jax.Array:
        return jnp.square(wasserstein_to_rows(v, c))

    return _best_of(
        key,
        x,
        w,
        num_clusters=num_clusters,
        n_init=n_init,
        max_iter=max_iter,
        tol_abs=_tolerance(x, w, tol, None),
        dist_fn=dist_fn,
        centers_fn=centers_fn,
    )


def _unit(scale: jax.Array) -> jax.Array:
    """A positive finite divisor: ``scale``, or 1 where it is 0 or not finite."""
    return jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)


def k_wmeans(
    key: Key,
    cbe: jax.Array,
    weights: jax.Array | None = None,
    *,
    rule: Literal["code", "paper"] = "code",
    centroid: Literal["mean", "barycenter"] = "mean",
    num_clusters: int = 2,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    distances: jax.Array | None = None,
) -> KMeansResult:
    """MARS's clustering of clients by their CBE vectors.

    Args:
      key: PRNG key (the official code reseeds with 0 every round: pass a fixed key for that).
      cbe: ``[N, M]`` CBE vectors (finite where ``weights > 0``).
      weights: ``[N]``; rows of weight 0 are left out (their columns of ``D`` are zeroed too).
      rule: ``"code"``: Euclidean k-means on the rows of the W1 matrix; ``"paper"``: W1 k-means.
      centroid: ``rule="paper"`` only, see :func:`wasserstein_kmeans`.
      num_clusters: k (2 in MARS).
      n_init: restarts.
      max_iter: iteration cap.
      tol: relative tolerance.
      distances: optional precomputed ``[N, N]`` W1 matrix (``rule="code"``).

    Returns:
      :class:`KMeansResult`; ``centers`` are in the feature space of the rule (rows of ``D`` or CBE)
      divided by the largest entry: both rules are invariant to a positive scale of the data, and
      the division keeps squared distances finite in float32 when a client's energies are huge
      (the official code computes these distances in float64).
    """
    n = cbe.shape[0]
    w = jnp.ones(n, jnp.float32) if weights is None else weights.astype(jnp.float32)
    active = w > 0
    safe = jnp.where(active[:, None], cbe.astype(jnp.float32), 0.0)
    if rule == "code":
        d = wasserstein_matrix(safe) if distances is None else distances.astype(jnp.float32)
        d = jnp.where(active[:, None] & active[None, :], d, 0.0)
        d = d / _unit(jnp.max(d))
        return kmeans(
            key,
            d,
            w,
            num_clusters=num_clusters,
            n_init=n_init,
            max_iter=max_iter,
            tol=tol,
            num_features=jnp.sum(active),
        )
    if rule == "paper":
        return wasserstein_kmeans(
            key,
            safe / _unit(jnp.max(jnp.abs(safe))),
            w,
            num_clusters=num_clusters,
            n_init=n_init,
            max_iter=max_iter,
            tol=tol,
            centroid=centroid,
        )
    raise ValueError(f"rule must be 'code' or 'paper', got {rule!r}")
