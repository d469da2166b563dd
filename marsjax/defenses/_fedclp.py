"""FedCLP: channel-Lipschitzness-based pruning of every local model, then FedAvg.

CLP: Zheng, Tang, Li & Liu, "Data-Free Backdoor Removal Based on Channel Lipschitzness", ECCV 2022,
arXiv:2208.03111. The MARS paper's "FedCLP" baseline (mars_spec §2.1, §2.4) applies CLP with
``u = 3`` to every uploaded local model before averaging.

For every convolution followed by a BatchNorm, channel ``k``'s upper bound of the channel
Lipschitz constant is the largest singular value of the kernel slice of that output channel,
reshaped to ``(C_in, kh * kw)`` and scaled by ``|gamma_k / sqrt(running_var_k + 1e-5)|``. Channels
above ``mean + u * std`` of their layer (``std`` with Bessel's correction, as ``torch.std``) are
pruned: the BatchNorm's scale and bias of that channel are set to 0 in the local model. The
pruned local models are then averaged (FedAvg), so a pruned channel's update becomes
``-global``.

Conv/BN pairs are found by name: a BatchNorm module ``.../bnX`` (or ``..._bn``) pairs with the
sibling convolution ``.../convX`` (``..._conv``), the layout of marsjax's SimpleNet and ResNet-18.
Convolutions without a BatchNorm (the paper's MNIST SimpleNet has no BatchNorm at all), option
``lone_convs``:

* ``"prune"`` (the default, a marsjax extension): such a convolution is scored by its unscaled
  kernel norm and pruned by zeroing its output channel (kernel slice and bias).
* ``"skip"``: such convolutions are never scored or pruned. This is CLP's own rule (its loop
  scores a convolution when the BatchNorm after it is reached, so a convolution without one is
  passed over), and the rule the MARS code's ``CBE()``, a copy of CLP's function, follows too
  (mars_spec §1.2). On a network without BatchNorm FedCLP is then exactly FedAvg. The MARS
  repository ships its FedCLP only compiled; that it skips such convolutions is inferred from its
  CLP origin, not read.

Measured on the official MNIST federation (SimpleNet without BatchNorm, ``experiments/README.md``):
with ``"prune"`` FedCLP's global model diverges after about 15 rounds with or without an attack
(each client prunes 0-3 of the 70 conv channels per round); the mechanism was not isolated.
Dense layers are never pruned (CLP only scores convolutions), so an MLP is plain FedAvg.

**The MARS code's FedCLP is not reproduced on purpose.** Its compiled baseline
(``defenses/__pycache__/fedclp.cpython-38.pyc`` in the official MARS repository, read by
disassembly) prunes each loaded update's model in a first loop, overwriting one ``local_model``
each time, and then, in a second loop over the ``fl_no_models`` updates, accumulates the update of
that one ``local_model``: it aggregates the LAST client's pruned model ``n`` times and the other
clients not at all. (It also reads the update files ``update_0 .. update_{n-1}``, which in the
MARS 100-client setting are the attacker ids.) marsjax prunes every local model and averages all
of them, which is what the paper describes; the paper's FedCLP numbers (Table 2) therefore need
not match ours. There is no option for the bug.

Nobody is rejected: ``accepted`` is 1 on valid rows; ``scores`` is the fraction of channels pruned
in each local model. The per-channel singular values come from ``jnp.linalg.eigvalsh`` of the
small ``min(C_in, kh * kw)``-sized Gram matrices, batched over channels, one client at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marsjax.defenses._robust_utils import finish, masked_weighted_mean, prepare
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult, EmptyState

__all__ = ["channel_lipschitz", "clp_masks", "conv_bn_pairs", "fedclp"]

_HI = jax.lax.Precision.HIGHEST


def _channel_grams(kernel: jax.Array) -> jax.Array:
    """``[C_out, m, m]`` Gram matrices of the per-channel ``(C_in, kh*kw)`` slices,
    ``m = min(C_in, kh*kw)`` (same nonzero eigenvalues either way)."""
    kh, kw, cin, cout = kernel.shape
    m = jnp.transpose(kernel.reshape(kh * kw, cin, cout), (2, 1, 0))  # [C_out, C_in, kh*kw]
    if cin <= kh * kw:
        return jnp.einsum("cik,cjk->cij", m, m, precision=_HI)
    return jnp.einsum("cik,cil->ckl", m, m, precision=_HI)


def _largest_singular_values(grams: list[jax.Array]) -> list[jax.Array]:
    """``sqrt(lambda_max)`` of every Gram matrix, all layers in ONE batched ``eigvalsh``.

    The matrices are zero-padded to a common size (a PSD matrix padded with zeros keeps its largest
    eigenvalue). One LAPACK call instead of one per layer: XLA:CPU was seen to hang on programs with
    many independent LAPACK custom calls (jax 0.10, 2 threads).
    """
    size = max(g.shape[-1] for g in grams)
    padded = [jnp.pad(g, ((0, 0), (0, size - g.shape[-1]), (0, size - g.shape[-1]))) for g in grams]
    lam = jnp.linalg.eigvalsh(jnp.concatenate(padded, axis=0))[:, -1]
    s = jnp.sqrt(jnp.maximum(lam, 0.0))
    out, i = [], 0
    for g in grams:
        out.append(s[i : i + g.shape[0]])
        i += g.shape[0]
    return out


def channel_lipschitz(kernel: jax.Array, gain: jax.Array | None = None) -> jax.Array:
    """``[C_out]`` largest singular value of each output channel's ``(C_in, kh*kw)`` kernel slice.

    Args:
      kernel: ``[kh, kw, C_in, C_out]`` (flax layout).
      gain: optional ``[C_out]`` factor (the BN gain ``|gamma / sigma|``).
    """
    s = _largest_singular_values([_channel_grams(kernel)])[0]
    return s if gain is None else s * jnp.abs(gain)


def conv_bn_pairs(params) -> tuple[list[tuple[tuple, tuple]], list[tuple]]:
    """Finds ``(conv_path, bn_path)`` pairs and the convolutions without a BatchNorm.

    Paths are tuples of dict keys under ``params``. A BN module holds ``scale`` and ``bias``; a
    convolution holds a 4-D ``kernel``.
    """
    pairs, lone = [], []

    def walk(node, prefix):
        if not hasattr(node, "items"):
            return
        names = set(node.keys())
        for name, sub in node.items():
            if not hasattr(sub, "items"):
                continue
            k = sub.get("kernel") if hasattr(sub, "get") else None
            if k is not None and len(k.shape) == 4:
                bn = name.replace("conv", "bn")
                if bn != name and bn in names and "scale" in node[bn]:
                    pairs.append((prefix + (name,), prefix + (bn,)))
                else:
                    lone.append(prefix + (name,))
            else:
                walk(sub, prefix + (name,))

    walk(params, ())
    return pairs, lone


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _outlier_mask(lips: jax.Array, u: float) -> jax.Array:
    n = lips.shape[0]
    mean = jnp.mean(lips)
    std = jnp.sqrt(jnp.sum(jnp.square(lips - mean)) / max(n - 1, 1))
    return lips > mean + u * std


LONE_CONVS = ("prune", "skip")


def clp_masks(variables, u: float = 3.0, eps: float = 1e-5, lone_convs: str = "prune"):
    """CLP's pruning decision for one model.

    ``lone_convs``: ``"prune"`` scores the convolutions without a BatchNorm by their kernel norm,
    ``"skip"`` leaves them out (no entry in ``conv_masks``), as CLP does.

    Returns:
      ``(bn_masks, conv_masks)``: dicts ``path -> bool[C]`` (True = prune) for the paired BN
      modules and for the lone convolutions.
    """
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    pairs, lone = conv_bn_pairs(params)
    if lone_convs not in LONE_CONVS:
        raise ValueError(f"lone_convs must be one of {LONE_CONVS}, got {lone_convs!r}")
    if lone_convs == "skip":
        lone = []
    paths = [c for c, _ in pairs] + list(lone)
    if not paths:
        return {}, {}
    sigmas = _largest_singular_values([_channel_grams(_get(params, c)["kernel"]) for c in paths])
    bn_masks, conv_masks = {}, {}
    for (_, bpath), sig in zip(pairs, sigmas):
        gamma = _get(params, bpath)["scale"]
        try:
            var = _get(stats, bpath)["var"]
        except (KeyError, TypeError):
            var = jnp.ones_like(gamma)
        var = jnp.where(jnp.isnan(var) | (var < 0), 0.0, var)
        gain = gamma / jnp.sqrt(var + eps)
        bn_masks[bpath] = _outlier_mask(sig * jnp.abs(gain), u)
    for cpath, sig in zip(lone, sigmas[len(pairs) :]):
        conv_masks[cpath] = _outlier_mask(sig, u)
    return bn_masks, conv_masks


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def fedclp(u: float = 3.0, lone_convs: str = "prune") -> Defense:
    """FedCLP: CLP (threshold ``mean + u * std`` per layer) on every local model, then FedAvg.

    The pruning decisions are computed one client at a time (``lax.map``: one local model in
    memory); since pruning only overwrites whole channels, the average of the pruned models is the
    average of the updates with those channels' entries replaced by ``-global``.

    Args:
      u: CLP's threshold in standard deviations (the MARS baselines: 3).
      lone_convs: convolutions without a BatchNorm: ``"prune"`` (default, the marsjax extension)
        or ``"skip"`` (CLP's rule; see the module docstring).
    """
    if lone_convs not in LONE_CONVS:
        raise ValueError(f"lone_convs must be one of {LONE_CONVS}, got {lone_convs!r}")

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del key, client_ids
        valid, clean, w = prepare(updates, client_weights)

        def masks_of(delta):
            local = jax.tree.map(lambda g, d: g + d, global_variables, delta)
            return clp_masks(local, u, lone_convs=lone_convs)

        bn_masks, conv_masks = jax.lax.map(masks_of, clean)  # dicts path -> bool [N, C]
        update = masked_weighted_mean(clean, w)
        total = jnp.sum(w)
        inv = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
        gparams, cparams = global_variables["params"], clean["params"]
        pruned = jnp.zeros(w.shape, jnp.float32)
        channels = 0
        for masks, leaves in ((bn_masks, ("scale", "bias")), (conv_masks, ("kernel", "bias"))):
            for path, mask in masks.items():
                gnode, cnode = _get(gparams, path), _get(cparams, path)
                for leaf in leaves:
                    if leaf not in cnode:
                        continue
                    d, g = cnode[leaf], gnode[leaf]
                    m = mask.reshape((mask.shape[0],) + (1,) * (d.ndim - 2) + (mask.shape[1],))
                    rows = jnp.where(m, -g[None].astype(d.dtype), d)
                    agg = jnp.tensordot(w.astype(d.dtype), rows, axes=(0, 0), precision=_HI) * inv
                    _set(update["params"], (*path, leaf), agg.astype(d.dtype))
                pruned = pruned + jnp.sum(mask, axis=1)
                channels += mask.shape[1]
        frac = pruned / max(channels, 1)
        accepted, scores = finish(valid.astype(jnp.float32), frac, valid)
        return DefenseResult(update, accepted, scores), state

    return Defense(lambda v: EmptyState(), apply)


def _build(ctx: DefenseContext, u: float = 3.0, lone_convs: str = "prune") -> Defense:
    return fedclp(u, lone_convs)
