"""Type aliases shared across marsjax.

Conventions (see DESIGN.md):

* ``Variables`` is a flax variables dict, ``{"params": ..., "batch_stats": ...}``. BatchNorm running
  statistics are part of what a client uploads: MARS reads the clients' running variance.
* ``Updates`` is a pytree with the structure of ``Variables`` whose every leaf carries a leading
  client axis ``[N, ...]`` (``Update`` is one client's, no leading axis).
* ``Key`` is a typed key from ``jax.random.key``.
"""

from __future__ import annotations

from typing import Any

import jax

PyTree = Any
Array = jax.Array
Key = jax.Array
Params = PyTree
Variables = PyTree
Update = PyTree
Updates = PyTree
Batch = tuple[jax.Array, jax.Array]  # (images uint8/float [B, H, W, C], labels int32 [B])
Metrics = dict[str, jax.Array]

__all__ = ["Array", "Batch", "Key", "Metrics", "Params", "PyTree", "Update", "Updates", "Variables"]
