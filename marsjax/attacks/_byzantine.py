"""Byzantine (untargeted) attacks: label flipping, LIE, IPM, Min-Max and Min-Sum.

These attacks lower the global model's accuracy instead of planting a backdoor (the MARS paper's
Tables 18/19 report LFA and LIE with ACC/TPR/FPR over long runs, mars_spec §3.5). Each is
re-implemented from its paper; public implementations were read for facts only.

* ``lfa`` (label flipping; Fang, Cao, Jia, Gong, "Local Model Poisoning Attacks to
  Byzantine-Robust Federated Learning", USENIX Security 2020, §"label flipping"; Tolpegin et al.,
  ESORICS 2020): every attacker trains honestly on its own shard with every label flipped,
  ``y -> C - 1 - y`` (``flip="reverse"``, the common choice) or ``y -> (y + 1) mod C``
  (``flip="shift"``). Data-level only: the simulator's local training of the attacker rows is the
  attack (``poison`` relabels); ``craft`` multiplies the rows by ``scale`` (1).
* ``lie`` ("A Little Is Enough", Baruch, Baruch, Goldberg, NeurIPS 2019): every attacker uploads
  ``mean - z * std``, coordinate-wise over the round's benign updates, with the paper's
  ``z_max``: ``s = floor(n / 2 + 1) - f`` and ``z = Φ^{-1}((n - s) / n)`` (``n`` clients in the
  round, ``f`` attackers among them). ``z`` given explicitly overrides the formula.
* ``ipm`` (Inner Product Manipulation; Xie, Koyejo, Gupta, "Fall of Empires: Breaking
  Byzantine-tolerant SGD by Inner Product Manipulation", UAI 2020): every attacker uploads
  ``-epsilon * mean`` of the benign updates, so that the inner product of the aggregate with the
  true update turns negative. The paper studies small and large ``epsilon``; 0.5 is the default
  here.
* ``minmax`` / ``minsum`` (Shejwalkar & Houmansadr, "Manipulating the Byzantine: Optimizing Model
  Poisoning Attacks and Defenses for Federated Learning", NDSS 2021, the AGR-agnostic attacks):
  every attacker uploads ``mean + γ p`` with the perturbation ``p`` = ``-mean / ||mean||``
  (``perturbation="unit_vec"``), ``-std`` (``"std"``) or ``-sign(mean)`` (``"sign"``), and the
  largest ``γ`` such that the malicious update's largest distance to a benign update (Min-Max),
  or the sum of its squared distances to the benign updates (Min-Sum), is at most the largest such
  value between benign updates. ``γ`` is found by the paper's halving search from ``gamma_init``
  (10) to tolerance ``tau`` (1e-5); without any feasible ``γ > tau`` the upload is the benign mean.

**Knowledge.** As in those papers' strongest (omniscient) setting, the attackers know the benign
updates of the round: ``craft`` reads the benign rows of the same round (``~is_malicious``),
computes the statistics over them (unweighted; every leaf of the update, BatchNorm statistics
included) and overwrites the attacker rows, all identical. The standard deviation is the
population one (``ddof=0``). The simulator's own (honest) training of the attacker rows is thrown
away (``poison`` is the identity), except for ``lfa``, whose training is the attack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy.special

from marsjax.attacks._mra import identity_poison, pattern_trigger_fn, write_rows
from marsjax.attacks.base import Attack, AttackContext, CraftContext, EmptyState

__all__ = [
    "FLIPS",
    "PERTURBATIONS",
    "benign_stats",
    "ipm",
    "label_flipping",
    "lie",
    "lie_z",
    "min_max",
    "min_sum",
    "minmax_gamma",
]

FLIPS = ("reverse", "shift")
PERTURBATIONS = ("unit_vec", "std", "sign")
_HI = jax.lax.Precision.HIGHEST


def benign_stats(updates, benign: jax.Array):
    """Coordinate-wise mean and population std of the rows where ``benign`` (``[N]`` bool).

    Returns:
      ``(mean, std)``, trees shaped like one row. With no benign row both are 0.
    """
    w = benign.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w), 1.0)

    def bc(u):
        return w.reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)

    mean = jax.tree.map(lambda u: jnp.sum(bc(u) * u, axis=0) / count.astype(u.dtype), updates)
    var = jax.tree.map(
        lambda u, m: jnp.sum(bc(u) * jnp.square(u - m[None]), axis=0) / count.astype(u.dtype),
        updates,
        mean,
    )
    return mean, jax.tree.map(jnp.sqrt, var)


def lie_z(n, f) -> jax.Array:
    """LIE's ``z_max = Φ^{-1}((n - s) / n)`` with ``s = floor(n / 2 + 1) - f`` (Baruch et al. §3).

    ``n``, ``f`` may be traced; the probability is clipped to ``[1e-6, 1 - 1e-6]`` so that ``z``
    stays finite when the attackers alone are a majority.
    """
    n = jnp.asarray(n, jnp.float32)
    s = jnp.floor(n / 2.0 + 1.0) - jnp.asarray(f, jnp.float32)
    p = jnp.clip((n - s) / n, 1e-6, 1.0 - 1e-6)
    return jax.scipy.special.ndtri(p)


def _scale_rows(updates, rows, scale: float):
    def f(u):
        s = jnp.where(rows, jnp.asarray(scale, u.dtype), jnp.asarray(1.0, u.dtype))
        return u * s.reshape((-1,) + (1,) * (u.ndim - 1))

    return jax.tree.map(f, updates)


def label_flipping(ctx: AttackContext, flip: str = "reverse", scale: float = 1.0) -> Attack:
    """Label flipping (LFA): attackers train on their shards with every label flipped.

    Args:
      ctx: static facts of the run.
      flip: ``"reverse"`` (``y -> C - 1 - y``) or ``"shift"`` (``y -> (y + 1) mod C``).
      scale: multiplies the attackers' updates (1: plain data poisoning).
    """
    if flip not in FLIPS:
        raise ValueError(f"attack.options.flip must be one of {FLIPS}, got {flip!r}")
    if not scale > 0:
        raise ValueError(f"attack.options.scale must be > 0, got {scale}")
    c = ctx.num_classes

    def poison(key, x, y, state):
        if flip == "reverse":
            return x, (c - 1 - y).astype(y.dtype)
        return x, ((y + 1) % c).astype(y.dtype)

    def craft(key, updates, state, cc: CraftContext):
        if scale == 1.0:
            return updates, state
        return _scale_rows(updates, cc.is_malicious, scale), state

    return Attack(lambda v: EmptyState(), poison, craft, pattern_trigger_fn(ctx))


def lie(ctx: AttackContext, z: float | None = None) -> Attack:
    """A Little Is Enough: every attacker uploads ``mean - z * std`` of the benign updates.

    Args:
      ctx: static facts of the run.
      z: the number of standard deviations; ``None``: the paper's ``z_max`` for the round's
        ``n`` clients and ``f`` attackers (:func:`lie_z`).
    """
    if z is not None and not z >= 0:
        raise ValueError(f"attack.options.z must be None or >= 0, got {z}")

    def craft(key, updates, state, c: CraftContext):
        mal = c.is_malicious
        n = mal.shape[0]
        zz = lie_z(n, jnp.sum(mal)) if z is None else jnp.float32(z)
        mean, std = benign_stats(updates, ~mal)
        bad = jax.tree.map(lambda m, s: m - zz.astype(m.dtype) * s, mean, std)
        return write_rows(updates, mal, bad), state

    return Attack(lambda v: EmptyState(), identity_poison, craft, pattern_trigger_fn(ctx))


def ipm(ctx: AttackContext, epsilon: float = 0.5) -> Attack:
    """Inner Product Manipulation: every attacker uploads ``-epsilon * mean`` of the benign updates.

    Args:
      ctx: static facts of the run.
      epsilon: the multiplier (> 0).
    """
    if not epsilon > 0:
        raise ValueError(f"attack.options.epsilon must be > 0, got {epsilon}")

    def craft(key, updates, state, c: CraftContext):
        mal = c.is_malicious
        mean, _ = benign_stats(updates, ~mal)
        bad = jax.tree.map(lambda m: -jnp.asarray(epsilon, m.dtype) * m, mean)
        return write_rows(updates, mal, bad), state

    return Attack(lambda v: EmptyState(), identity_poison, craft, pattern_trigger_fn(ctx))


def _perturbation(mean, std, kind: str):
    if kind == "unit_vec":
        nrm = jnp.sqrt(sum(jnp.sum(jnp.square(m)) for m in jax.tree.leaves(mean)))
        inv = jnp.where(nrm > 0, 1.0 / jnp.where(nrm > 0, nrm, 1.0), 0.0)
        return jax.tree.map(lambda m: -m * inv.astype(m.dtype), mean)
    if kind == "std":
        return jax.tree.map(jnp.negative, std)
    return jax.tree.map(lambda m: -jnp.sign(m), mean)


def minmax_gamma(
    updates,
    benign: jax.Array,
    mean,
    p,
    *,
    objective: str,
    gamma_init: float = 10.0,
    tau: float = 1e-5,
    max_iter: int = 200,
) -> jax.Array:
    """The largest ``γ`` (halving search, Shejwalkar & Houmansadr Alg. 1) keeping ``mean + γ p``
    within the benign updates' spread.

    ``objective="minmax"``: ``max_i ||m - u_i|| <= max_{i,j} ||u_i - u_j||``; ``"minsum"``:
    ``Σ_i ||m - u_i||^2 <= max_i Σ_j ||u_i - u_j||^2``, over the benign rows ``i, j``.
    Returns 0 when no ``γ`` above ``tau`` satisfies it.
    """
    w = benign.astype(jnp.float32)
    # ||mean + γ p - u_i||^2 = a_i + 2 γ b_i + γ^2 c, with v_i = u_i - mean.
    a = jnp.zeros(w.shape, jnp.float32)
    b = jnp.zeros(w.shape, jnp.float32)
    gram = jnp.zeros((w.shape[0], w.shape[0]), jnp.float32)
    c = jnp.float32(0.0)
    for u, m, pl in zip(jax.tree.leaves(updates), jax.tree.leaves(mean), jax.tree.leaves(p)):
        v = (u - m[None]).reshape(u.shape[0], -1).astype(jnp.float32)
        pv = pl.reshape(-1).astype(jnp.float32)
        a = a + jnp.sum(jnp.square(v), axis=1)
        b = b - jnp.dot(v, pv, precision=_HI)
        c = c + jnp.sum(jnp.square(pv))
        gram = gram + jnp.dot(v, v.T, precision=_HI)
    pair = jnp.maximum(a[:, None] + a[None, :] - 2.0 * gram, 0.0)  # ||u_i - u_j||^2
    both = (w[:, None] * w[None, :]) > 0
    if objective == "minmax":
        bound = jnp.max(jnp.where(both, pair, 0.0))

        def ok(g):
            d = a + 2.0 * g * b + g * g * c
            return jnp.max(jnp.where(w > 0, d, -jnp.inf)) <= bound
    else:
        bound = jnp.max(jnp.where(w > 0, jnp.sum(jnp.where(both, pair, 0.0), axis=1), 0.0))

        def ok(g):
            d = a + 2.0 * g * b + g * g * c
            return jnp.sum(jnp.where(w > 0, d, 0.0)) <= bound

    def cond(s):
        g, succ, _, it = s
        return (jnp.abs(succ - g) > tau) & (it < max_iter)

    def body(s):
        g, succ, step, it = s
        good = ok(g)
        succ = jnp.where(good, g, succ)
        g = jnp.where(good, g + step, g - step)
        return g, succ, step / 2.0, it + 1

    g0 = jnp.float32(gamma_init)
    _, succ, _, _ = jax.lax.while_loop(cond, body, (g0, jnp.float32(0.0), g0 / 2.0, 0))
    return succ


def _min_max_attack(
    ctx: AttackContext, objective: str, perturbation: str, gamma_init: float, tau: float
) -> Attack:
    if perturbation not in PERTURBATIONS:
        raise ValueError(
            f"attack.options.perturbation must be one of {PERTURBATIONS}, got {perturbation!r}"
        )
    if not gamma_init > 0 or not tau > 0:
        raise ValueError("attack.options.gamma_init and tau must be > 0")

    def craft(key, updates, state, c: CraftContext):
        mal = c.is_malicious
        mean, std = benign_stats(updates, ~mal)
        p = _perturbation(mean, std, perturbation)
        g = minmax_gamma(
            updates, ~mal, mean, p, objective=objective, gamma_init=gamma_init, tau=tau
        )
        bad = jax.tree.map(lambda m, pl: m + g.astype(m.dtype) * pl, mean, p)
        return write_rows(updates, mal, bad), state

    return Attack(lambda v: EmptyState(), identity_poison, craft, pattern_trigger_fn(ctx))


def min_max(
    ctx: AttackContext,
    perturbation: str = "unit_vec",
    gamma_init: float = 10.0,
    tau: float = 1e-5,
) -> Attack:
    """Min-Max (NDSS 2021): ``mean + γ p``, its largest distance to a benign update bounded by
    the benign updates' largest pairwise distance.

    Args:
      ctx: static facts of the run.
      perturbation: ``"unit_vec"`` (``-mean/||mean||``), ``"std"`` (``-std``) or ``"sign"``
        (``-sign(mean)``).
      gamma_init: the search's first ``γ`` (10).
      tau: the search's tolerance (1e-5).
    """
    return _min_max_attack(ctx, "minmax", perturbation, gamma_init, tau)


def min_sum(
    ctx: AttackContext,
    perturbation: str = "unit_vec",
    gamma_init: float = 10.0,
    tau: float = 1e-5,
) -> Attack:
    """Min-Sum (NDSS 2021): ``mean + γ p``, its sum of squared distances to the benign updates
    bounded by the largest such sum of a benign update. Options as :func:`min_max`."""
    return _min_max_attack(ctx, "minsum", perturbation, gamma_init, tau)
