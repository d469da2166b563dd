"""Applying the aggregated update to the global model (the server's rule).

Two rules, selectable (mars_spec §1.7, §6.4):

* ``mean`` (the paper's text): ``global += server_lr * update``, where ``update`` is the
  defense's weighted mean of the accepted client updates.
* ``sum`` (the official code, inherited from backdoors101/3DFed):
  ``global += eta / num_clients * sum_{accepted} delta_i``; with 20 of 100 clients sampled and 16
  accepted that is ``0.8 * 16 / 100 = 0.128`` times the mean accepted update.

Parameters move through an optax optimizer (plain SGD with step 1 by default, so a user can put
FedAdam-style server optimizers in); BatchNorm running statistics are averaged like the official
code does (added with the same scale, no optimizer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from marsjax.types import PyTree, Variables

__all__ = ["apply_update", "rule_scale", "server_optimizer", "tree_all_finite"]


def server_optimizer() -> optax.GradientTransformation:
    """The default server optimizer: ``params -= 1 * (-step)``, i.e. add the scaled update."""
    return optax.sgd(1.0)


def rule_scale(rule: str, accepted_weight_sum, *, server_lr: float, eta: float, num_clients: int):
    """The factor that multiplies the defense's mean update under ``rule``."""
    if rule == "mean":
        return jnp.asarray(server_lr, jnp.float32)
    if rule == "sum":
        return jnp.asarray(eta / num_clients, jnp.float32) * accepted_weight_sum
    raise ValueError(f"server rule must be 'mean' or 'sum', got {rule!r}")


def apply_update(
    global_variables: Variables,
    update: PyTree,
    scale,
    opt: optax.GradientTransformation,
    opt_state: optax.OptState,
) -> tuple[Variables, optax.OptState]:
    """``global + scale * update`` (parameters through ``opt``, running statistics directly)."""
    params = global_variables["params"]
    grads = jax.tree.map(lambda u: -scale.astype(u.dtype) * u, update["params"])
    steps, opt_state = opt.update(grads, opt_state, params)
    out = dict(global_variables)
    out["params"] = optax.apply_updates(params, steps)
    if "batch_stats" in global_variables:
        out["batch_stats"] = jax.tree.map(
            lambda g, u: g + scale.astype(g.dtype) * u,
            global_variables["batch_stats"],
            update["batch_stats"],
        )
    return out, opt_state


def tree_all_finite(tree: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
