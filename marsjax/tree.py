"""Helpers for stacked pytrees (a leading client axis on every leaf)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from marsjax.types import PyTree, Updates

__all__ = [
    "flatten_stacked",
    "row_is_finite",
    "select_leaves",
    "tree_add_scaled",
    "tree_norm",
    "unflatten_like",
    "weighted_mean",
    "weighted_sum",
    "zero_rows",
]


def flatten_stacked(
    updates: Updates, leaf_filter: Callable[[tuple, jax.Array], bool] | None = None
):
    """``[N, ...]``-stacked tree -> ``[N, D]`` matrix (leaves in tree order, optionally filtered).

    ``leaf_filter(path, leaf)`` selects leaves (e.g. only ``params``, or only the output layer).
    """
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    rows = [
        leaf.reshape(leaf.shape[0], -1)
        for path, leaf in flat
        if leaf_filter is None or leaf_filter(path, leaf)
    ]
    return jnp.concatenate(rows, axis=1)


def unflatten_like(vector: jax.Array, like: PyTree) -> PyTree:
    """``[D]`` vector -> tree shaped like ``like`` (no client axis), inverse of a one-row flatten."""
    leaves, treedef = jax.tree.flatten(like)
    out, i = [], 0
    for leaf in leaves:
        out.append(vector[i : i + leaf.size].reshape(leaf.shape).astype(leaf.dtype))
        i += leaf.size
    return jax.tree.unflatten(treedef, out)


_HI = jax.lax.Precision.HIGHEST


def _gemv(weights: jax.Array, updates: Updates) -> PyTree:
    """``weights @ u.reshape(N, -1)`` per leaf: the weighted sum as one matrix-vector product."""

    def f(u):
        s = jnp.dot(weights.astype(u.dtype), u.reshape(u.shape[0], -1), precision=_HI)
        return s.reshape(u.shape[1:])

    return jax.tree.map(f, updates)


def weighted_sum(updates: Updates, weights: jax.Array) -> PyTree:
    """``sum_i w_i * u_i`` over the client axis; rows with ``w_i == 0`` never contribute (even NaN).

    Computed as a plain matrix-vector product per leaf (a GEMV: memory speed on every backend).
    A row with weight 0 holding NaN or Inf would poison that product (``0 * nan = nan``), so when
    its result is not finite the sum is redone with those rows masked out (``jnp.where``, ~50x
    slower on XLA:CPU); with finite uploads only the GEMV runs. The result is the masked sum in
    both cases, up to float summation order (benchmarks/bench_mars.py, ``fedavg_mean``).
    """
    plain = _gemv(weights, updates)

    def masked():
        def f(u):
            w = weights.astype(u.dtype).reshape((-1,) + (1,) * (u.ndim - 1))
            return jnp.sum(jnp.where(w != 0, w * u, 0), axis=0)

        return jax.tree.map(f, updates)

    finite = jnp.all(row_is_finite(jax.tree.map(lambda x: x[None], plain)))
    return jax.lax.cond(finite, lambda: plain, masked)


def weighted_mean(updates: Updates, weights: jax.Array) -> PyTree:
    """``sum_i w_i u_i / sum_i w_i``; all-zero weights give a zero update."""
    total = jnp.sum(weights)
    scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
    return jax.tree.map(lambda s: s * scale.astype(s.dtype), weighted_sum(updates, weights))


def row_is_finite(updates: Updates) -> jax.Array:
    """``[N]`` bool: every entry of client ``i``'s update is finite.

    Computed as ``u.reshape(N, -1) @ 0`` per leaf: an entry times 0 is NaN exactly when the entry
    is NaN or infinite (finite huge values give 0), and a sum holding a NaN is NaN. A GEMV runs at
    memory speed on XLA:CPU, ``jnp.all(jnp.isfinite(u), axis=1)`` ~13x slower (measured on 20
    ResNet-18 updates: 0.031 s vs 0.40 s).
    """
    per_leaf = [
        jnp.isfinite(jnp.dot(leaf.reshape(leaf.shape[0], -1), jnp.zeros(leaf[0].size, leaf.dtype)))
        for leaf in jax.tree.leaves(updates)
    ]
    return jnp.all(jnp.stack(per_leaf), axis=0)


def zero_rows(updates: Updates, keep: jax.Array) -> Updates:
    """Replaces the rows where ``keep`` is False by zeros."""
    return jax.tree.map(
        lambda u: jnp.where(keep.reshape((-1,) + (1,) * (u.ndim - 1)), u, jnp.zeros_like(u)),
        updates,
    )


def tree_add_scaled(tree: PyTree, other: PyTree, scale) -> PyTree:
    """``tree + scale * other`` leafwise."""
    return jax.tree.map(
        lambda a, b: a + jnp.asarray(scale, a.dtype) * b.astype(a.dtype), tree, other
    )


def tree_norm(tree: PyTree) -> jax.Array:
    """Global L2 norm of a tree (no client axis)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def select_leaves(tree: PyTree, collection: str) -> PyTree:
    """The sub-tree of a variables dict (``"params"`` or ``"batch_stats"``), empty dict if absent."""
    return tree.get(collection, {}) if isinstance(tree, dict) else getattr(tree, collection, {})
