"""MARS: a malignity-aware backdoor defense (Wan et al., NeurIPS 2025, arXiv:2509.20383).

One round (mars_spec §1, Algorithm 1, the official ``defenses/mars.py``):

1. rebuild every client's model ``theta_i = theta_G + Delta_i`` (BatchNorm running statistics
   included: BE reads the client's own ``running_var``);
2. backdoor energy per conv channel and its concentrated top-kappa part, a ``[N, M]`` CBE matrix
   (:mod:`marsjax.mars.energy`, ``vmap`` over clients);
3. split the clients in two by K-WMeans (:func:`marsjax.mars.clustering.k_wmeans`; by default the
   official code's rule, Euclidean 2-means on the rows of the pairwise W1 matrix; the option
   ``distance="euclidean"`` / ``"cosine"`` replaces W1 here and in step 4, the paper's Table 7);
4. cluster centers ``A_1, A_2`` = elementwise means of the members' CBE vectors; if
   ``W1(A_1, A_2) <= epsilon`` nobody is rejected, else the cluster whose center has the smaller L1
   norm is kept (``select="min_l1"``; MARS* keeps the larger cluster, ``select="majority"``);
5. aggregate the kept updates with the round's client weights.

Hostile input. A row with ``client_weights == 0`` (dropped by the round) or with any non-finite
entry is excluded before it can influence anyone: its CBE row (every client's energy is computed
independently, so NaN stays in its own row) is replaced by zeros, it gets weight 0 in the
clustering (its column of the W1 matrix is zeroed too), and ``accepted = 0``. A finite update so
large that its backdoor energy overflows float32 (1e30 entries do) is excluded the same way,
flagged by its non-finite CBE. With fewer than two valid clients, or when one cluster holds no
valid client, every valid client is accepted. Everything is one jit-able function: no host
callbacks, static shapes, ``jnp.where`` instead of branches.

Deviations, all documented in mars_spec §6: the aggregation is the weighted mean of the accepted
updates (the simulator's server rule applies the official ``eta/total * sum``); k-means uses JAX's
random streams, not sklearn's (same algorithm; like the official ``random_state=0`` it is reseeded
with the same key every round unless ``seed=None``); CBE keeps a fixed count per layer (identical
unless values tie); a convolution without BatchNorm is scored unscaled.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from marsjax.defenses.base import Defense, DefenseContext, DefenseResult
from marsjax.mars.clustering import k_wmeans
from marsjax.mars.energy import (
    ENERGY_METHODS,
    EnergyLayout,
    EnergyMethod,
    GramForm,
    backdoor_energy,
    concentrated_backdoor_energy,
    energy_layout,
    module_call_order,
)
from marsjax.mars.wasserstein import wasserstein_1d, wasserstein_matrix, wasserstein_to_rows
from marsjax.tree import row_is_finite, weighted_mean
from marsjax.types import Key, Updates, Variables

__all__ = [
    "DISTANCES",
    "MarsDecision",
    "MarsState",
    "cbe_distance_matrix",
    "cbe_distance_to_rows",
    "mars",
    "mars_cbe",
    "mars_select",
    "model_energy_layout",
]

_INVALID_SCORE = float(jnp.finfo(jnp.float32).max)

# Distances between CBE vectors (the paper's Table 7 compares the three; W1 is MARS's).
DISTANCES = ("wasserstein", "euclidean", "cosine")
Distance = Literal["wasserstein", "euclidean", "cosine"]


def cbe_distance_to_rows(x: jax.Array, rows: jax.Array, distance: Distance) -> jax.Array:
    """``[N, K]`` distances from every row of ``x`` ``[N, M]`` to every row of ``rows`` ``[K, M]``.

    ``"wasserstein"``: W1 between the values as uniform empirical distributions
    (:func:`~marsjax.mars.wasserstein.wasserstein_to_rows`, = ``scipy.stats.wasserstein_distance``);
    ``"euclidean"``: ``||a - b||_2``; ``"cosine"``: ``1 - a.b / (||a|| ||b||)``
    (``scipy.spatial.distance.cosine``; a zero vector counts as orthogonal to everything, where
    scipy returns NaN).
    """
    if distance == "wasserstein":
        return wasserstein_to_rows(x, rows)
    x = x.astype(jnp.float32)
    rows = rows.astype(jnp.float32)
    if distance == "euclidean":
        diff = x[:, None, :] - rows[None, :, :]
        return jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1))
    if distance == "cosine":
        nx = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))
        nr = jnp.sqrt(jnp.sum(jnp.square(rows), axis=-1))
        dot = jnp.einsum("nm,km->nk", x, rows, precision=jax.lax.Precision.HIGHEST)
        denom = nx[:, None] * nr[None, :]
        sim = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)
        return jnp.maximum(1.0 - sim, 0.0)
    raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")


def cbe_distance_matrix(x: jax.Array, distance: Distance) -> jax.Array:
    """``[N, N]`` pairwise distances between the CBE rows ``x`` (see :func:`cbe_distance_to_rows`);
    ``"wasserstein"`` is :func:`~marsjax.mars.wasserstein.wasserstein_matrix`."""
    if distance == "wasserstein":
        return wasserstein_matrix(x)
    d = cbe_distance_to_rows(x, x, distance)
    d = 0.5 * (d + d.T)  # exactly symmetric
    return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d)


class MarsState(NamedTuple):
    """MARS keeps no memory between rounds; ``epsilon`` lives here so it can be swept by ``vmap``.

    Attributes:
      epsilon: scalar float32, the "no attack" threshold on ``W1(A_1, A_2)``.
    """

    epsilon: jax.Array


def model_energy_layout(
    model: Any, example_input: Any, *, layers: Literal["conv_bn", "all"] = "conv_bn", **kwargs: Any
) -> EnergyLayout:
    """The energy layout of a flax model, in the order it calls its layers (no FLOPs).

    Args:
      model: a ``flax.linen.Module``.
      example_input: an input batch (array or ``jax.ShapeDtypeStruct``), e.g. ``[1, H, W, C]``.
      layers: ``"conv_bn"`` or ``"all"``.
      **kwargs: extra keyword arguments of the model call.

    Returns:
      The static :data:`~marsjax.mars.energy.EnergyLayout`.
    """
    order = module_call_order(model, example_input, **kwargs)
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), example_input)
    return energy_layout(shapes, layers=layers, module_order=order)


def _subtree(variables: Variables, layout: EnergyLayout) -> dict:
    """Only the leaves BE reads: kernels, BatchNorm scales and running variances."""
    params = variables["params"]
    stats = variables.get("batch_stats", {})

    def put(tree: dict, path: tuple[str, ...], leaf: str, value: Any) -> None:
        for name in path:
            tree = tree.setdefault(name, {})
        tree[leaf] = value

    def get(tree: Any, path: tuple[str, ...]) -> Any:
        for name in path:
            tree = tree[name]
        return tree

    out_p: dict = {}
    out_s: dict = {}
    for layer in layout:
        put(out_p, layer.path, "kernel", get(params, layer.path)["kernel"])
        if layer.norm is not None:
            put(out_p, layer.norm, "scale", get(params, layer.norm)["scale"])
            put(out_p, layer.norm, "bias", get(params, layer.norm)["bias"])
            put(out_s, layer.norm, "var", get(stats, layer.norm)["var"])
            put(out_s, layer.norm, "mean", get(stats, layer.norm)["mean"])
    return {"params": out_p, "batch_stats": out_s}


def mars_cbe(
    updates: Updates,
    global_variables: Variables,
    layout: EnergyLayout,
    *,
    kappa: float = 0.05,
    chunk_size: int | None = None,
    energy_method: EnergyMethod = "eigvalsh",
    gram_form: GramForm | None = None,
) -> jax.Array:
    """CBE of every client model ``global + update``.

    Args:
      updates: ``[N, ...]`` stacked updates (the tree of ``global_variables``).
      global_variables: the global model.
      layout: static layout (:func:`model_energy_layout` or
        :func:`~marsjax.mars.energy.energy_layout`).
      kappa: kept fraction per layer.
      chunk_size: ``None``: all clients at once (``vmap``); else ``lax.map`` over chunks of this
        many clients (bounds memory for large N).
      energy_method: ``"eigvalsh"`` or ``"squaring"`` (:func:`~marsjax.mars.energy.backdoor_energy`).
      gram_form: ``"reduce"``, ``"pairs"`` or ``"channel_major"`` (default: by backend;
        :func:`~marsjax.mars.energy.channel_spectral_norms`).

    Returns:
      ``[N, M]`` float32.
    """
    g = _subtree(global_variables, layout)
    u = _subtree(updates, layout)

    def one(ui: dict) -> jax.Array:
        model = jax.tree.map(lambda a, b: a.astype(jnp.float32) + b.astype(jnp.float32), g, ui)
        be = backdoor_energy(model, layout=layout, method=energy_method, gram_form=gram_form)
        return concentrated_backdoor_energy(be, kappa)

    if chunk_size is None:
        return jax.vmap(one)(u)
    return jax.lax.map(one, u, batch_size=chunk_size)


class MarsDecision(NamedTuple):
    """What :func:`mars_select` decides.

    Attributes:
      accepted: ``[N]`` bool.
      scores: ``[N]`` float32, W1 from each CBE row to the kept cluster's center (invalid rows:
        ``float32.max``).
      labels: ``[N]`` int32 cluster of each row (meaningless for invalid rows).
      centers: ``[2, M]`` elementwise means of the valid members' CBE rows.
      gap: scalar, ``W1(centers[0], centers[1])``.
      attack: scalar bool, whether an attack was declared (``gap > epsilon`` with two non-empty
        clusters).
      kept: scalar int32, the cluster kept when an attack is declared.
    """

    accepted: jax.Array
    scores: jax.Array
    labels: jax.Array
    centers: jax.Array
    gap: jax.Array
    attack: jax.Array
    kept: jax.Array


def mars_select(
    key: Key,
    cbe: jax.Array,
    valid: jax.Array,
    epsilon: jax.Array | float = 0.03,
    *,
    clustering: Literal["code", "paper"] = "code",
    select: Literal["min_l1", "majority"] = "min_l1",
    centroid: Literal["mean", "barycenter"] = "mean",
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    distance: Distance = "wasserstein",
) -> MarsDecision:
    """Clusters the CBE rows in two and decides whom to accept (Algorithm 1, lines 12-22).

    Args:
      key: k-means key.
      cbe: ``[N, M]`` CBE rows (rows where ``valid`` is False are ignored; any values).
      valid: ``[N]`` bool, rows that take part.
      epsilon: the no-attack threshold on ``W1(A_1, A_2)`` (``<=``, as the code).
      clustering: ``"code"`` or ``"paper"`` (:func:`~marsjax.mars.clustering.k_wmeans`).
      select: ``"min_l1"`` (MARS) or ``"majority"`` (MARS*; ties go to the smaller L1 norm).
      centroid: ``clustering="paper"`` only.
      n_init: k-means restarts.
      max_iter: Lloyd iteration cap.
      tol: k-means relative tolerance.
      distance: between CBE vectors, everywhere W1 is used (the matrix the clustering reads, the
        gap of the centers, the scores): ``"wasserstein"`` (MARS), ``"euclidean"`` or
        ``"cosine"`` (the paper's Table 7). The other two need ``clustering="code"``; ``epsilon``
        is then in their units.

    Returns:
      :class:`MarsDecision`. With fewer than two valid rows, or a cluster without valid members,
      every valid row is accepted.
    """
    _check_distance(distance, clustering)
    cbe = jnp.where(valid[:, None], cbe.astype(jnp.float32), 0.0)
    result = k_wmeans(
        key,
        cbe,
        valid.astype(jnp.float32),
        rule=clustering,
        centroid=centroid,
        num_clusters=2,
        n_init=n_init,
        max_iter=max_iter,
        tol=tol,
        distances=None if distance == "wasserstein" else cbe_distance_matrix(cbe, distance),
    )
    labels = result.labels
    member = (labels[:, None] == jnp.arange(2)[None, :]) & valid[:, None]  # [N, 2]
    size = jnp.sum(member, axis=0)
    centers = jnp.einsum(
        "nk,nm->km", member.astype(jnp.float32), cbe, precision=jax.lax.Precision.HIGHEST
    ) / jnp.maximum(size, 1)[:, None].astype(jnp.float32)
    if distance == "wasserstein":
        gap = wasserstein_1d(centers[0], centers[1])
    else:
        gap = cbe_distance_to_rows(centers[:1], centers[1:], distance)[0, 0]
    by_l1 = jnp.argmin(jnp.sum(jnp.abs(centers), axis=1))
    if select == "min_l1":
        kept = by_l1
    elif select == "majority":
        kept = jnp.where(size[0] == size[1], by_l1, jnp.argmax(size))
    else:
        raise ValueError(f"select must be 'min_l1' or 'majority', got {select!r}")
    attack = (gap > epsilon) & (jnp.min(size) > 0)
    accepted = valid & (~attack | (labels == kept))
    to_kept = cbe_distance_to_rows(cbe, centers[kept][None, :], distance)[:, 0]
    scores = jnp.where(valid, to_kept, _INVALID_SCORE)
    return MarsDecision(accepted, scores, labels, centers, gap, attack, kept.astype(jnp.int32))


def _check_distance(distance, clustering) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if distance != "wasserstein" and clustering != "code":
        raise ValueError(f"distance={distance!r} needs clustering='code' (k-means on its matrix)")


def _check_args(
    kappa, epsilon, clustering, select, layers, distance="wasserstein", energy_method="eigvalsh"
) -> None:
    if energy_method not in ENERGY_METHODS:
        raise ValueError(f"energy_method must be one of {ENERGY_METHODS}, got {energy_method!r}")
    if clustering not in ("code", "paper"):
        raise ValueError(f"clustering must be 'code' or 'paper', got {clustering!r}")
    _check_distance(distance, clustering)
    if select not in ("min_l1", "majority"):
        raise ValueError(f"select must be 'min_l1' or 'majority', got {select!r}")
    if layers not in ("conv_bn", "all"):
        raise ValueError(f"layers must be 'conv_bn' or 'all', got {layers!r}")
    if not 0.0 < kappa <= 1.0:
        raise ValueError(f"kappa must be in (0, 1], got {kappa!r}")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")


def mars(
    kappa: float = 0.05,
    epsilon: float = 0.03,
    clustering: Literal["code", "paper"] = "code",
    select: Literal["min_l1", "majority"] = "min_l1",
    layers: Literal["conv_bn", "all"] = "conv_bn",
    seed: int | None = 0,
    *,
    centroid: Literal["mean", "barycenter"] = "mean",
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    layout: EnergyLayout | None = None,
    chunk_size: int | None = None,
    distance: Distance = "wasserstein",
    energy_method: EnergyMethod = "eigvalsh",
) -> Defense:
    """The MARS defense (``select="majority"`` gives MARS*).

    Args:
      kappa: fraction of channels per layer kept in CBE (0.05 = the paper's kappa of 5%). Static.
      epsilon: no-attack threshold on the W1 distance between the two cluster centers (0.03); the
        initial value of ``MarsState.epsilon``.
      clustering: ``"code"`` (k-means on W1-matrix rows, official) or ``"paper"`` (W1 k-means).
      select: ``"min_l1"`` (keep the cluster whose center has the smaller L1 norm, MARS) or
        ``"majority"`` (keep the larger cluster, MARS*; ties go to the smaller L1 norm).
      layers: ``"conv_bn"`` (official) or ``"all"`` (adds fully connected layers).
      seed: k-means seed; the official code reseeds sklearn with 0 every round. ``None``: use the
        round's ``key`` instead.
      centroid: ``clustering="paper"`` only: ``"mean"`` or ``"barycenter"``.
      n_init: k-means restarts.
      max_iter: Lloyd iteration cap.
      tol: k-means relative tolerance.
      layout: which layers to score, in order (see :func:`model_energy_layout`). Default: found in
        ``global_variables`` when ``apply`` is traced, in the dict's own order, which is only right
        if the dict kept the definition order (see :mod:`marsjax.mars.energy`).
      chunk_size: compute the CBEs ``chunk_size`` clients at a time (``None``: all at once).
      distance: between CBE vectors: ``"wasserstein"`` (MARS), ``"euclidean"`` or ``"cosine"``
        (Table 7; :func:`mars_select`).
      energy_method: how each channel's spectral norm is found: ``"eigvalsh"`` (LAPACK's
        eigensolver on the channel's Gram matrix, the reference) or ``"squaring"`` (repeated
        squaring of the trace-normalised Gram, plain matrix products;
        :func:`~marsjax.mars.energy.channel_spectral_norms`).

    Returns:
      A :class:`~marsjax.defenses.base.Defense`. ``apply`` returns ``accepted`` in {0, 1} and
      ``scores`` = W1 distance from each client's CBE to the center of the cluster the selection
      rule keeps (computed even when no attack is declared; higher = farther from the benign
      group); excluded rows score ``float32.max``.
    """
    _check_args(kappa, epsilon, clustering, select, layers, distance, energy_method)
    if layout is not None and not layout:
        raise ValueError("layout has no layers to score")

    def init(global_variables: Variables) -> MarsState:
        del global_variables
        return MarsState(jnp.asarray(epsilon, jnp.float32))

    def apply(
        key: Key,
        updates: Updates,
        state: MarsState,
        *,
        global_variables: Variables,
        client_weights: jax.Array,
        client_ids: jax.Array | None = None,
    ) -> tuple[DefenseResult, MarsState]:
        del client_ids  # MARS keeps no per-client history
        lay = layout
        if lay is None:
            lay = _with_dense_fallback(
                energy_layout(global_variables, layers=layers),
                lambda: energy_layout(global_variables, layers="all", warn=False),
            )
        client_weights = client_weights.astype(jnp.float32)

        finite = row_is_finite(updates)
        # Non-finite entries propagate to NaN/inf in that client's CBE row only (every client's
        # energy is computed independently), so the raw updates go in and the row is dropped
        # below. Masking the updates first gives the same result but triples XLA:CPU compile time.
        cbe = mars_cbe(
            updates,
            global_variables,
            lay,
            kappa=kappa,
            chunk_size=chunk_size,
            energy_method=energy_method,
        )
        valid = (client_weights > 0) & finite & jnp.all(jnp.isfinite(cbe), axis=1)

        cluster_key = jax.random.key(seed) if seed is not None else key
        decision = mars_select(
            cluster_key,
            cbe,
            valid,
            state.epsilon,
            clustering=clustering,
            select=select,
            centroid=centroid,
            n_init=n_init,
            max_iter=max_iter,
            tol=tol,
            distance=distance,
        )
        accepted = decision.accepted.astype(jnp.float32)
        update = weighted_mean(updates, accepted * client_weights)
        return DefenseResult(update=update, accepted=accepted, scores=decision.scores), state

    return Defense(init=init, apply=apply)


def _with_dense_fallback(layout: EnergyLayout, all_layers: Any) -> EnergyLayout:
    """``layout``, or, for a network without convolutions, its dense layers (with a warning)."""
    if layout:
        return layout
    layout = all_layers()
    if not layout:
        raise ValueError("MARS found no convolution or dense layer to score in the model")
    warnings.warn(
        "MARS: the model has no convolution; scoring its dense layers instead (layers='all', one "
        "spectral norm per layer)",
        stacklevel=3,
    )
    return layout


def _build(
    ctx: DefenseContext,
    kappa: float = 0.05,
    epsilon: float = 0.03,
    clustering: Literal["code", "paper"] = "code",
    select: Literal["min_l1", "majority"] = "min_l1",
    layers: Literal["conv_bn", "all"] = "conv_bn",
    seed: int | None = 0,
    centroid: Literal["mean", "barycenter"] = "mean",
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    chunk_size: int | None = None,
    distance: Distance = "wasserstein",
    energy_method: EnergyMethod = "eigvalsh",
) -> Defense:
    """Registry hook for ``"mars"``: :func:`mars` with the layer layout traced from ``ctx.model``.

    The layout comes from ``ctx.model`` called on a ``[1, *ctx.image_shape]`` float32 input, in call
    order, so it does not depend on the order of the variables dict's keys.
    """
    # before ctx: validate() runs these
    _check_args(kappa, epsilon, clustering, select, layers, distance, energy_method)
    layout = None
    if ctx.model is not None:
        x = jax.ShapeDtypeStruct((1, *ctx.image_shape), jnp.float32)
        layout = _with_dense_fallback(
            model_energy_layout(ctx.model, x, layers=layers),
            lambda: model_energy_layout(ctx.model, x, layers="all"),
        )
    return mars(
        kappa,
        epsilon,
        clustering,
        select,
        layers,
        seed,
        centroid=centroid,
        n_init=n_init,
        max_iter=max_iter,
        tol=tol,
        layout=layout,
        chunk_size=chunk_size,
        distance=distance,
        energy_method=energy_method,
    )


def _build_star(
    ctx: DefenseContext,
    kappa: float = 0.05,
    epsilon: float = 0.03,
    clustering: Literal["code", "paper"] = "code",
    layers: Literal["conv_bn", "all"] = "conv_bn",
    seed: int | None = 0,
    centroid: Literal["mean", "barycenter"] = "mean",
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    chunk_size: int | None = None,
    distance: Distance = "wasserstein",
    energy_method: EnergyMethod = "eigvalsh",
) -> Defense:
    """Registry hook for ``"mars_star"``: MARS* (keeps the majority cluster, paper §5.2)."""
    return _build(
        ctx,
        kappa=kappa,
        epsilon=epsilon,
        clustering=clustering,
        select="majority",
        layers=layers,
        seed=seed,
        centroid=centroid,
        n_init=n_init,
        max_iter=max_iter,
        tol=tol,
        chunk_size=chunk_size,
        distance=distance,
        energy_method=energy_method,
    )
