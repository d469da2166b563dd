"""3DFed's modules as pure functions (Li et al., "3DFed: Adaptive and Extensible Framework for
Covert Backdoor Attack in Federated Learning", IEEE S&P 2023; used by MARS, arXiv:2509.20383).

Each function here is one piece of mars_spec §4, written on plain arrays so that it can be tested
on hand-made inputs and composed inside the compiled round by :mod:`marsjax.attacks._3dfed`:

* :func:`indicator_feedback`, :func:`indicator_status`: read the implanted indicators back from the
  next global model (§4.2) -> accepted / clipped / rejected, and the weak-DP switch.
* :func:`tune_decoys`, :func:`tune_alpha`: adaptive tuning of the decoy count and the per-group
  noise-mask ``α`` (§4.3).
* :func:`norm_match_scale`: the scale that matches the backdoored update's norm to a benign
  reference (§4.4).
* :func:`choose_indicator_positions`, :func:`layer_curvature`: where the indicators go (§4.5).
* :func:`choose_neurons`, :func:`init_noise_masks`, :func:`optimize_noise_masks`: the output-layer
  noise masks, optimised with a Lagrangian so that a group's masks cancel (§4.6).
* :func:`implant_value`: the value an indicator takes in an upload (§4.6).
* :func:`decoy_positions`, :func:`decoy_param_loss`: the decoy models' target parameter and
  loss (§4.7).

Statuses are int32 codes: :data:`NONE` (no upload in that slot), :data:`REJECTED`,
:data:`CLIPPED`, :data:`ACCEPTED`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from marsjax.client import sgd

__all__ = [
    "ACCEPTED",
    "CLIPPED",
    "NONE",
    "REJECTED",
    "choose_indicator_positions",
    "choose_neurons",
    "decoy_param_loss",
    "decoy_positions",
    "implant_value",
    "indicator_feedback",
    "indicator_status",
    "init_noise_masks",
    "layer_curvature",
    "noise_mask_objective",
    "norm_match_scale",
    "optimize_noise_masks",
    "tune_alpha",
    "tune_decoys",
]

NONE, REJECTED, CLIPPED, ACCEPTED = 0, 1, 2, 3


def _safe_sqrt(s):
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


# ------------------------------------------------------------------------------------------------
# Indicators (§4.2)


def indicator_feedback(
    global_update: jax.Array, positions: jax.Array, values: jax.Array
) -> jax.Array:
    """``feedback_i = g[I_i] / v_i``.

    Args:
      global_update: ``[P]`` the flattened indicator layer of ``θ_G(t) - θ_G(t-1)``.
      positions: ``[S]`` int32 flat indicator positions, one per upload slot.
      values: ``[S]`` the values the indicators had in the uploads (0 for an unused slot).

    Returns:
      ``[S]`` feedback (0 where ``values`` is 0).
    """
    nz = values != 0
    return jnp.where(nz, global_update[positions] / jnp.where(nz, values, 1.0), 0.0)


def indicator_status(
    feedback: jax.Array,
    uploaded: jax.Array,
    threshold: float,
    clip_ratio: float = 0.8,
) -> tuple[jax.Array, jax.Array]:
    """Each upload's fate from its feedback, and whether the server looks like weak DP.

    * weak DP: some uploaded slot has ``feedback > 1`` or ``feedback < -threshold``;
    * rejected: ``feedback <= threshold``;
    * clipped: ``threshold < feedback <= clip_ratio * max(feedback)``;
    * accepted: ``feedback > clip_ratio * max(feedback)``.

    Args:
      feedback: ``[S]`` from :func:`indicator_feedback`.
      uploaded: ``[S]`` bool, the slots that held an upload last attack round.
      threshold: 1e-5 (CIFAR) / 1e-4 (MNIST) in the official code.
      clip_ratio: 0.8.

    Returns:
      ``(status [S] int32, weak_dp bool)``; slots not uploaded get :data:`NONE`.
    """
    weak_dp = jnp.any(uploaded & ((feedback > 1.0) | (feedback < -threshold)))
    fmax = jnp.max(jnp.where(uploaded, feedback, -jnp.inf))
    status = jnp.where(
        feedback <= threshold,
        REJECTED,
        jnp.where(feedback <= clip_ratio * fmax, CLIPPED, ACCEPTED),
    )
    return jnp.where(uploaded, status, NONE).astype(jnp.int32), weak_dp


# ------------------------------------------------------------------------------------------------
# Adaptive tuning (§4.3)


def tune_decoys(
    num_decoys: jax.Array, attacker_status: jax.Array, decoy_status: jax.Array, max_decoys: int
) -> jax.Array:
    """The decoy count after one round of feedback.

    ``k <- max(k - #accepted decoys, 0)``; then ``k <- k + 1`` if no attacker upload was accepted
    or clipped and no decoy was accepted; capped at ``max_decoys`` (static slots).

    Args:
      num_decoys: int32 ``k``.
      attacker_status: ``[A]`` int32 statuses of the attacker slots.
      decoy_status: ``[K]`` int32 statuses of the decoy slots.
      max_decoys: the static cap ``K``.
    """
    acc_decoys = jnp.sum(decoy_status == ACCEPTED).astype(jnp.int32)
    k = jnp.maximum(num_decoys - acc_decoys, 0)
    any_att = jnp.any((attacker_status == ACCEPTED) | (attacker_status == CLIPPED))
    k = k + ((~any_att) & (acc_decoys == 0)).astype(jnp.int32)
    return jnp.minimum(k, max_decoys).astype(jnp.int32)


def tune_alpha(
    key: jax.Array,
    alpha: jax.Array,
    attacker_status: jax.Array,
    group_of: jax.Array,
    *,
    candidate_ratio: float = 0.8,
    alpha_low: float = 0.0,
    step: float = 0.1,
    alpha_min: float = 0.01,
    alpha_max: float = 0.99,
) -> jax.Array:
    """New per-group noise-mask ``α`` from last round's statuses.

    A group is *active* if some member uploaded, and a *candidate* if at least ``candidate_ratio``
    of its uploading members were accepted. With ``a`` the candidates' ``α`` sorted ascending:

    * every active group a candidate: ``α_g ~ U(a[0], a[1])`` (``a[1] = a[0]`` with one
      candidate);
    * some: ``α_g ~ U(a[0], a[0] + step)``;
    * none: ``α_g ~ U(alpha_low, 1)`` (``noise_mask_alpha``), or ``U(0, 1)`` when only one
      group is active.

    Every group then is clamped to ``[alpha_min, alpha_max]``.

    Args:
      key: PRNG key.
      alpha: ``[G]`` last round's values.
      attacker_status: ``[A]`` int32 statuses of the attacker slots.
      group_of: ``[A]`` int32 group of each slot.

    Returns:
      ``[G]`` float32.
    """
    num_groups = alpha.shape[0]
    up = (attacker_status != NONE).astype(jnp.float32)
    acc = (attacker_status == ACCEPTED).astype(jnp.float32)
    n_up = jax.ops.segment_sum(up, group_of, num_segments=num_groups)
    n_acc = jax.ops.segment_sum(acc, group_of, num_segments=num_groups)
    active = n_up > 0
    cand = active & (n_acc >= candidate_ratio * n_up)
    n_cand = jnp.sum(cand)
    n_active = jnp.sum(active)
    a = jnp.sort(jnp.where(cand, alpha, jnp.inf))
    lo = a[0]
    hi = a[jnp.clip(n_cand - 1, 0, 1)]
    u = jax.random.uniform(key, (num_groups,))
    all_case = lo + u * (hi - lo)
    some_case = lo + u * step
    none_case = jnp.where(n_active == 1, u, alpha_low + u * (1.0 - alpha_low))
    new = jnp.where(
        (n_cand > 0) & (n_cand == n_active),
        all_case,
        jnp.where(n_cand > 0, some_case, none_case),
    )
    return jnp.clip(new, alpha_min, alpha_max).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Norm matching (§4.4)


def norm_match_scale(norm_benign: jax.Array, norm_backdoor: jax.Array, max_scale: float = 5.0):
    """``max(min(||Δ_ben|| / ||Δ_bd||, max_scale), 1)``: scale up a small backdoored update."""
    ratio = jnp.where(
        norm_backdoor > 0, norm_benign / jnp.where(norm_backdoor > 0, norm_backdoor, 1), 1.0
    )
    return jnp.maximum(jnp.minimum(ratio, max_scale), 1.0)


# ------------------------------------------------------------------------------------------------
# Indicator positions (§4.5)


def choose_indicator_positions(
    analog: jax.Array,
    curvature: jax.Array,
    num_needed: jax.Array,
    *,
    num_candidate: int,
    max_positions: int,
) -> jax.Array:
    """Indicator positions: low curvature among the smallest-magnitude candidates.

    The candidates are the ``num_candidate * num_needed`` positions with the smallest ``analog``
    (``|Δ_bd| + |Δ_ben|``); among them, positions are ordered by ``|curvature|`` and then by
    ``analog`` (so, among positions of exactly zero curvature, the smaller analog first).

    Args:
      analog: ``[P]`` flattened ``|Δ_bd| + |Δ_ben|`` of the indicator layer.
      curvature: ``[P]`` the Hessian-diagonal proxy (:func:`layer_curvature`).
      num_needed: int32, ``n_adv + k`` positions needed (``<= max_positions``).
      num_candidate: the official ``num_candidate`` (10).
      max_positions: static number of slots ``S``.

    Returns:
      ``[max_positions]`` int32 flat positions; the first ``num_needed`` are the chosen ones, in
      order (attackers first, then decoys).
    """
    p = analog.shape[0]
    c_max = min(num_candidate * max_positions, p)
    _, cand = jax.lax.top_k(-analog, c_max)
    ok = jnp.arange(c_max) < num_candidate * num_needed
    c_abs = jnp.where(ok, jnp.abs(curvature[cand]), jnp.inf)
    order = jnp.lexsort((analog[cand], c_abs))
    out = cand[order]
    if max_positions > c_max:
        out = jnp.concatenate([out, jnp.broadcast_to(out[-1:], (max_positions - c_max,))])
    return out[:max_positions].astype(jnp.int32)


def layer_curvature(loss_of_layer: Callable[[jax.Array], jax.Array], w: jax.Array) -> jax.Array:
    """``∂(Σ_w ∂L/∂w)/∂w`` = the Hessian's row sums ``H·1`` of ``loss_of_layer`` at ``w``.

    Reverse over reverse, literally the official construction (the gradient of the summed
    gradient); it also works through ``custom_vjp`` layers, which forward mode cannot enter.
    """
    return jax.grad(lambda v: jnp.sum(jax.grad(loss_of_layer)(v)))(w)


# ------------------------------------------------------------------------------------------------
# Noise masks (§4.6)


def choose_neurons(
    key: jax.Array, num_groups: int, num_classes: int, num_neurons: int, target: int
) -> jax.Array:
    """``[G, num_classes]`` bool: ``num_neurons`` random output neurons per group, never the target."""
    others = np.array([c for c in range(num_classes) if c != target], np.int32)
    m = min(num_neurons, len(others))

    def one(k):
        pick = jnp.asarray(others)[jax.random.permutation(k, len(others))[:m]]
        return jnp.zeros((num_classes,), bool).at[pick].set(True)

    return jax.vmap(one)(jax.random.split(key, num_groups))


def _group_sum(x: jax.Array, group_of: jax.Array, member: jax.Array, num_groups: int):
    m = member.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return jax.ops.segment_sum(x * m, group_of, num_segments=num_groups)


def init_noise_masks(
    key: jax.Array,
    neuron_mask: jax.Array,
    member: jax.Array,
    group_of: jax.Array,
    in_features: int,
    std: float,
    num_groups: int,
) -> tuple[jax.Array, jax.Array]:
    """Gaussian masks on the chosen output neurons, minus their group's mean.

    Args:
      neuron_mask: ``[A, out]`` bool, the neurons each slot's group perturbs.
      member: ``[A]`` bool, the slots that exist this round.
      group_of: ``[A]`` int32.
      in_features: the output layer's fan-in.

    Returns:
      ``(mask_w [A, in, out], mask_b [A, out])``: zero outside the chosen neurons and for
      non-members; each group's members sum to 0.
    """
    a, out = neuron_mask.shape
    kw, kb = jax.random.split(key)
    keep = neuron_mask & member[:, None]
    mw = std * jax.random.normal(kw, (a, in_features, out)) * keep[:, None, :]
    mb = std * jax.random.normal(kb, (a, out)) * keep
    cnt = jax.ops.segment_sum(member.astype(jnp.float32), group_of, num_segments=num_groups)
    inv = 1.0 / jnp.maximum(cnt, 1.0)
    mean_w = _group_sum(mw, group_of, member, num_groups) * inv[:, None, None]
    mean_b = _group_sum(mb, group_of, member, num_groups) * inv[:, None]
    mw = (mw - mean_w[group_of]) * keep[:, None, :]
    mb = (mb - mean_b[group_of]) * keep
    return mw, mb


def noise_mask_objective(
    masks: tuple[jax.Array, jax.Array],
    delta_w: jax.Array,
    delta_b: jax.Array,
    neuron_mask: jax.Array,
    member: jax.Array,
    group_of: jax.Array,
    alpha: jax.Array,
    lam: jax.Array,
    *,
    ups_coef: float = 0.1,
    norm_coef: float = 0.03,
    lag_coef: float = 0.01,
) -> jax.Array:
    """``Σ_g [Σ_{i∈g} (α_g UPs_i + (1-α_g) Norm_i) + λ_g Lag_g] / (1 + λ_g)``.

    * ``UPs_i = Σ_{j∈rand_g} ups_coef / (Σ|Δw[:, j] + n_i.w[:, j]| + |Δb[j] + n_i.b[j]|)``: keeps
      the chosen neurons' update magnitude from shrinking;
    * ``Norm_i = norm_coef ||n_i||_2`` (only the chosen neurons are non-zero);
    * ``Lag_g = lag_coef ||Σ_{i∈g} n_i||_2``: the group's masks should cancel.

    Its gradient in ``n_i`` equals that of member ``i``'s own official loss
    ``[α UPs_i + (1-α) Norm_i + λ Lag] / (1 + λ)``.

    Args:
      masks: ``(mask_w [A, in, out], mask_b [A, out])``.
      delta_w: ``[in, out]`` the backdoored update of the output kernel.
      delta_b: ``[out]`` and of its bias.
      neuron_mask: ``[A, out]`` bool.
      member: ``[A]`` bool.
      group_of: ``[A]`` int32.
      alpha: ``[A]`` each slot's group ``α``.
      lam: ``[G]`` Lagrange multipliers.
    """
    mw, mb = masks
    num_groups = lam.shape[0]
    nm = (neuron_mask & member[:, None]).astype(mw.dtype)
    mag = jnp.sum(jnp.abs(delta_w[None] + mw), axis=1) + jnp.abs(delta_b[None] + mb)  # [A, out]
    ups = jnp.sum(nm * ups_coef / jnp.maximum(mag, 1e-12), axis=1)  # [A]
    sq = jnp.sum(jnp.square(mw * nm[:, None, :]), axis=(1, 2)) + jnp.sum(jnp.square(mb * nm), 1)
    norm = norm_coef * _safe_sqrt(sq)
    per = jnp.where(member, alpha * ups + (1.0 - alpha) * norm, 0.0)
    per_group = jax.ops.segment_sum(per, group_of, num_segments=num_groups)
    sw = _group_sum(mw, group_of, member, num_groups)
    sb = _group_sum(mb, group_of, member, num_groups)
    lag = lag_coef * _safe_sqrt(jnp.sum(jnp.square(sw), axis=(1, 2)) + jnp.sum(jnp.square(sb), 1))
    return jnp.sum((per_group + lam * lag) / (1.0 + lam))


def optimize_noise_masks(
    masks: tuple[jax.Array, jax.Array],
    delta_w: jax.Array,
    delta_b: jax.Array,
    neuron_mask: jax.Array,
    member: jax.Array,
    group_of: jax.Array,
    alpha: jax.Array,
    num_groups: int,
    *,
    steps: int = 30,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    ups_coef: float = 0.1,
    norm_coef: float = 0.03,
    lag_coef: float = 0.01,
    lagrange_step: float = 0.1,
    lam0: float = 1.0,
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """Optimises the masks with SGD and dual ascent on ``λ`` (``λ_g += lagrange_step ||Σ n_i||``).

    Arguments as in :func:`noise_mask_objective`; ``alpha`` is ``[A]`` (each slot's group value).

    Returns:
      ``((mask_w, mask_b), λ [G])`` after ``steps`` steps; masks stay zero outside the chosen
      neurons and for non-members.
    """
    opt = sgd(lr, momentum, weight_decay)
    keep = (neuron_mask & member[:, None]).astype(masks[0].dtype)
    grad = jax.grad(noise_mask_objective)
    kw = {"ups_coef": ups_coef, "norm_coef": norm_coef, "lag_coef": lag_coef}

    def body(_, carry):
        m, opt_state, lam = carry
        g = grad(m, delta_w, delta_b, neuron_mask, member, group_of, alpha, lam, **kw)
        upd, opt_state = opt.update(g, opt_state, m)
        mw, mb = jax.tree.map(lambda a, b: a + b, m, upd)
        m = (mw * keep[:, None, :], mb * keep)
        sw = _group_sum(m[0], group_of, member, num_groups)
        sb = _group_sum(m[1], group_of, member, num_groups)
        lam = lam + lagrange_step * jnp.sqrt(
            jnp.sum(jnp.square(sw), axis=(1, 2)) + jnp.sum(jnp.square(sb), 1)
        )
        return m, opt_state, lam

    lam = jnp.full((num_groups,), lam0, jnp.float32)
    m, _, lam = jax.lax.fori_loop(0, steps, body, (masks, opt.init(masks), lam))
    return m, lam


def implant_value(x: jax.Array, scale: float = 1e5, zero_value: float = 1e-3) -> jax.Array:
    """An indicator's uploaded value: ``x * scale``, or ``zero_value`` where that is exactly 0."""
    v = x * scale
    return jnp.where(v == 0, jnp.asarray(zero_value, v.dtype), v)


# ------------------------------------------------------------------------------------------------
# Decoys (§4.7)


def decoy_positions(delta_bd: jax.Array, delta_ben: jax.Array, max_decoys: int) -> jax.Array:
    """``[max_decoys]`` int32: flat positions with the smallest ``|Δ_bd - Δ_ben|`` (ascending)."""
    d = jnp.abs(delta_bd - delta_ben).reshape(-1)
    k = min(max_decoys, d.shape[0])
    _, pos = jax.lax.top_k(-d, k)
    if k < max_decoys:
        pos = jnp.concatenate([pos, jnp.broadcast_to(pos[-1:], (max_decoys - k,))])
    return pos.astype(jnp.int32)


def decoy_param_loss(
    w: jax.Array,
    w_ref: jax.Array,
    coef: float = 10.0,
    limit: float = 10.0,
    tail: float = 1e-10,
) -> jax.Array:
    """``-coef |w - w_ref|`` while ``|w - w_ref| <= limit``, else ``tail |w - w_ref|``.

    Minimising it pushes one decoy parameter away from the benign value until it is ``limit``
    away, which makes the decoy a conspicuous outlier.
    """
    d = jnp.abs(w - w_ref)
    return jnp.where(d <= limit, -coef * d, tail * d)
