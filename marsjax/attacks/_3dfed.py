"""3DFed (Li et al., "3DFed: Adaptive and Extensible Framework for Covert Backdoor Attack in
Federated Learning", IEEE S&P 2023, pp. 1893-1907), the attack MARS (arXiv:2509.20383) is built to
stop. Re-implemented from mars_spec §4 (which documents the official code); no code is copied.

Per attack round, inside the compiled round (all shapes static):

1. **Constrained backdoor training**: one model for all the round's attackers, trained from
   ``θ_G`` with the blind loss ``0.3 CE(clean) + 0.3 CE(poisoned) + 0.4 ||θ - θ_G||_2`` (shared with
   :mod:`marsjax.attacks._mra`), ``lr`` 0.055, ``poison_epochs`` 15.
2. **Indicator feedback** (from the second attack round on): the indicator layer's change of the
   global model since the last attack round, divided by the implanted values, gives each upload's
   status (accepted / clipped / rejected) and the weak-DP switch (:func:`indicator_status`).
3. **Adaptive tuning**: the decoy count ``k`` and each group's noise-mask ``α``
   (:func:`tune_decoys`, :func:`tune_alpha`); under weak DP tuning stops and ``α = 0.1``.
4. **Norm matching** to the benign reference update ``Δ_ben``: ``Δ_bd *= max(min(||Δ_ben|| /
   ||Δ_bd||, max_scale), 1)`` (parameters only in the norms).
5. **Indicator positions** in the indicator layer (the last conv kernel): among the
   ``num_candidate (n_adv + k)`` smallest ``|Δ_bd| + |Δ_ben|``, the ones of smallest ``|H·1|``
   (Hessian-row-sum curvature of the clean plus the backdoor loss over one pass of the data).
6. **Noise masks** on ``num_neurons`` random non-target neurons of the output layer, per group of
   ``group_size`` attackers, optimised 30 SGD steps with the Lagrangian so that a group's masks
   cancel; each attacker uploads ``Δ_bd`` + its mask with its indicator implanted
   (``Δ[I_i] *= 1e5``, or ``1e-3`` where that is 0).
7. **Decoys** (when ``k > 0``): models trained from ``θ_G`` with ``(CE + param_loss) / 2`` that push
   one parameter of the decoy layer (the first dense kernel: ``fc`` of ResNet-18, ``fc1`` of
   SimpleNet, as the official code) ``decoy_limit`` away from the benign value; decoy ``i`` is
   written into the row of client ``num_clients - 1 - i`` **if that benign client is sampled**
   (mars_spec §6.14). This is the one place where an attack rewrites a benign client's row: the
   round still counts that row as benign for TPR/FPR, as the official code does.
8. The global model's indicator layer is kept for the next round's feedback.

The state (:class:`ThreeDFedState`) lives in ``RoundState.attack_state`` and is checkpointed.

**Scale of the constants.** The official constants assume large layers. An indicator is the
upload's entry ``Δ_bd[I]`` (one of the smallest of the layer) times ``indicator_scale`` = 1e5, and
it is read as rejected below ``indicator_threshold``, so ``threshold ~ 1 / scale`` only separates
"rejected" from "benign clients moved that weight" when the smallest entries are tiny (the
official code expects about 1e-8). Among the 2.4M weights of ResNet-18's ``layer4.1.conv2`` they
are ~1e-9. Measured on the paper's MNIST SimpleNet (``experiments/measure_3dfed_indicators.py``,
preset ``mnist_paper``, rounds 1-3 (0-based) from a random start; in round 0 the random model's
entries are large with either network;
``experiments/results/mnist_paper/3dfed_indicators.json``): **without BatchNorm** (the paper's
network) the chosen ``conv2`` entries are 3e-8 to 5e-7, the implanted values 0.003-0.045, and
the attackers' update norms (6.3-6.9) sit among the benign ones (median 6.3-11.9): the design
works as intended. **With BatchNorm** after each convolution the chosen entries are 2.5e-5 to
5.4e-4, the implanted values 2.5-54 against benign update norms of median 4.1-6.7, and the
attackers' update norms 5.0-54: the indicators themselves make the attackers outliers (a review
measured entries of 1e-5 to 2e-4, values 1-57 and benign norms of ~2.4 on Fashion-MNIST from a
pretrained start). What this does to the distance-based defenses is measured by the BatchNorm
ablation in ``experiments/README.md``. Among the 4.6k weights of the 8x8 ``digits``
SimpleNet the entries are ~1e-4 as well, so benign movement also triggers the weak-DP switch.
Likewise ``UPs = ups_coef / Σ|Δ_bd + n|`` grows the masks until ``Σ|·|`` over the output
neuron's fan-in is ~``ups_coef``-sized, which is large next to a 64-input output layer's update.
For such small models pass e.g. ``indicator_scale=1e3, indicator_threshold=1e-3,
ups_coef=1e-3`` (what the digits tests and results use).

**Data.** The shared backdoored model trains on the shard of the round's attacker with the
smallest client id (``data="first"``, the official "attacker 0") or on all the round's attackers'
shards (``data="pooled"``). The benign reference ``Δ_ben`` is the simulator's own update of that
first attacker's row: it is trained exactly like a benign client (its ``poison`` is the identity),
which is what the official code trains for it (``fl_local_epochs`` at the benign ``lr``).

**Differences from the official code** (and why):

* Slots and groups: the official code builds uploads for all ``n_adv`` = 20 attacker ids, in groups
  of 5 consecutive ids, of which MARS's sampler lets 4 random ones upload per round, so a group
  rarely uploads in full and its masks rarely cancel. Here the round's attackers (ranked by client
  id) are the slots and are grouped in that order, so masks of a group cancel in the aggregate as
  3DFed's design intends (3DFed's own setting lets all attackers participate every round).
  Un-sampled attackers have no indicator (they are not counted as rejected).
* The attackers are not shuffled before masks and indicators are assigned (all of them upload the
  same ``Δ_bd``, so only which mask goes with which indicator changes).
* The decoy count is capped at ``max_decoys`` (static slots); the official count is unbounded.
  Decoys that are not sampled are not trained (they could not be aggregated or read back).
* With a single candidate group among all-candidate groups, ``U(α[0], α[1])`` has no ``α[1]``;
  here it is ``α[0]`` (the group keeps its ``α``).
* The curvature is computed at the trained (unscaled) backdoored model, BatchNorm in training mode.
* ``constants="mnist"`` switches to the official MNIST constants (noise std 0.05, norm coefficient
  0.08, Lagrangian coefficient 0.1, threshold 1e-4, zero value 1e-2, group size 2, 8 neurons);
  any option given explicitly wins.
* Layer choice is generic: the indicator layer is the last 4-D kernel (``layer4_1/conv2`` on
  ResNet-18, ``conv2`` on SimpleNet), the output layer the last dense kernel and its bias, the decoy
  layer the first dense kernel; each can be named (``"fc1/kernel"``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from marsjax.attacks import _3dfed_components as C
from marsjax.attacks._mra import (
    attacker_data,
    attacker_ranks,
    check_common,
    forward,
    identity_poison,
    make_backdoor_trainer,
    make_blind_loss,
    params_norm,
    pattern_trigger_fn,
    stamp_fn,
    tree_sub,
    write_rows,
)
from marsjax.attacks.base import Attack, AttackContext, CraftContext
from marsjax.client import cross_entropy_loss, make_local_train
from marsjax.types import Variables

__all__ = ["CONSTANTS", "ThreeDFedState", "find_layers", "get_path", "set_path", "threedfed"]

# The constants that differ between the official CIFAR and MNIST configurations (mars_spec §4).
CONSTANTS = {
    "cifar": {
        "noise_std": 0.01,
        "norm_coef": 0.03,
        "lag_coef": 0.01,
        "indicator_threshold": 1e-5,
        "indicator_zero_value": 1e-3,
        "group_size": 5,
        "num_neurons": 5,
    },
    "mnist": {
        "noise_std": 0.05,
        "norm_coef": 0.08,
        "lag_coef": 0.1,
        "indicator_threshold": 1e-4,
        "indicator_zero_value": 1e-2,
        "group_size": 2,
        "num_neurons": 8,
    },
}


class ThreeDFedState(NamedTuple):
    """3DFed's memory between attack rounds (``S = A + K`` upload slots: attackers, then decoys).

    Attributes:
      last_indicator: ``[P]`` the flattened indicator layer of the last attack round's global
        model.
      positions: ``[S]`` int32 flat indicator positions used last attack round.
      values: ``[S]`` float32 implanted indicator values (0 = slot unused).
      uploaded: ``[S]`` bool, slots that were uploaded (attackers present, decoys sampled).
      status: ``[S]`` int32 the statuses read this round (logging and tests).
      feedback: ``[S]`` float32 the feedback read this round.
      num_decoys: int32 ``k``.
      alpha: ``[G]`` float32 per-group noise-mask ``α``.
      weak_dp: bool, weak DP detected (sticky).
      attack_rounds: int32, attack rounds crafted so far.
      scale: float32, last norm-matching factor.
    """

    last_indicator: jax.Array
    positions: jax.Array
    values: jax.Array
    uploaded: jax.Array
    status: jax.Array
    feedback: jax.Array
    num_decoys: jax.Array
    alpha: jax.Array
    weak_dp: jax.Array
    attack_rounds: jax.Array
    scale: jax.Array


# ------------------------------------------------------------------------------------------------
# Paths into variables dicts


def get_path(tree, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree, path: tuple[str, ...], value):
    """A copy of the nested dict ``tree`` with ``tree[path] = value``."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = set_path(tree[path[0]], path[1:], value)
    return out


def _parse(path: str | None) -> tuple[str, ...] | None:
    if path is None:
        return None
    return tuple(p for p in path.split("/") if p)


def find_layers(
    params,
    indicator: str | None = None,
    output: str | None = None,
    decoy: str | None = None,
) -> dict[str, tuple[str, ...] | None]:
    """The paths (inside ``params``) of the layers 3DFed works on.

    Defaults: indicator = the last 4-D kernel (the last conv), output = the last 2-D kernel (the
    classifier) with its ``bias`` sibling, decoy = the first 2-D kernel. Without any conv layer,
    the indicator layer is the 2-D kernel before the output (or the output itself).

    Returns:
      ``{"indicator", "output", "output_bias" (or None), "decoy"}`` path tuples.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [(tuple(str(getattr(k, "key", k)) for k in p), leaf) for p, leaf in flat]
    kernels4 = [n for n, leaf in names if n[-1] == "kernel" and leaf.ndim == 4]
    kernels2 = [n for n, leaf in names if n[-1] == "kernel" and leaf.ndim == 2]
    if not kernels2 and output is None:
        raise ValueError(
            "3DFed needs a dense output layer (a 2-D 'kernel'); name it with output_layer"
        )
    out = _parse(output) or kernels2[-1]
    dec = _parse(decoy) or kernels2[0]
    if indicator is not None:
        ind = _parse(indicator)
    elif kernels4:
        ind = kernels4[-1]
    else:
        ind = kernels2[-2] if len(kernels2) > 1 else kernels2[-1]
    leaves = dict(names)
    for what, p in (("indicator_layer", ind), ("output_layer", out), ("decoy_layer", dec)):
        if p not in leaves:
            raise ValueError(f"attack.options.{what}={'/'.join(p)!r} is not a parameter")
    if leaves[out].ndim != 2:
        raise ValueError("attack.options.output_layer must be a 2-D dense kernel")
    bias = out[:-1] + ("bias",)
    return {
        "indicator": ind,
        "output": out,
        "output_bias": bias if bias in leaves else None,
        "decoy": dec,
    }


# ------------------------------------------------------------------------------------------------
# The attack


def threedfed(
    ctx: AttackContext,
    lr: float = 0.055,
    poison_epochs: int = 15,
    poison_steps: int | None = None,
    batch_size: int | None = None,
    loss_weights: tuple[float, float, float] = (0.3, 0.3, 0.4),
    data: str = "first",
    constants: str = "cifar",
    max_scale: float = 5.0,
    group_size: int | None = None,
    num_neurons: int | None = None,
    noise_mask_alpha: float = 0.0,
    noise_std: float | None = None,
    noise_std_weak_dp: float = 0.01,
    mask_steps: int = 30,
    mask_lr: float = 0.1,
    mask_momentum: float = 0.9,
    mask_weight_decay: float = 5e-4,
    ups_coef: float = 0.1,
    norm_coef: float | None = None,
    lag_coef: float | None = None,
    lagrange_step: float = 0.1,
    indicator_threshold: float | None = None,
    clip_ratio: float = 0.8,
    indicator_scale: float = 1e5,
    indicator_zero_value: float | None = None,
    num_candidate: int = 10,
    candidate_ratio: float = 0.8,
    alpha_step: float = 0.1,
    alpha_range: tuple[float, float] = (0.01, 0.99),
    weak_dp_alpha: float = 0.1,
    max_decoys: int = 4,
    decoy_coef: float = 10.0,
    decoy_limit: float = 10.0,
    decoy_epochs: int | None = None,
    decoy_lr: float | None = None,
    curvature_batches: int | None = None,
    use_decoys: bool = True,
    use_masks: bool = True,
    use_indicators: bool = True,
    use_tuning: bool = True,
    indicator_layer: str | None = None,
    output_layer: str | None = None,
    decoy_layer: str | None = None,
) -> Attack:
    """3DFed with every module and constant of the official code (mars_spec §4).

    Args:
      ctx: static facts of the run.
      lr: backdoor-training SGD learning rate (MARS: 0.055; 3DFed: the benign lr).
      poison_epochs: backdoor-training epochs (``fl_poison_epochs`` 15).
      poison_steps: a fixed number of backdoor steps instead (tests).
      batch_size: attacker batch size (default: the benign clients').
      loss_weights: blind-loss weights (clean CE, poisoned CE, distance).
      data: ``"first"`` or ``"pooled"`` (module docstring).
      constants: ``"cifar"`` or ``"mnist"``: defaults of the options left at ``None``.
      max_scale: cap of the norm-matching factor (``fl_weight_scale`` 5).
      group_size: attackers per noise-mask group (``fl_adv_group_size``; 5 / MNIST 2).
      num_neurons: output neurons perturbed per group (``fl_num_neurons``; 5 / MNIST 8).
      noise_mask_alpha: lower bound of the ``α`` draw when no group is a candidate (0).
      noise_std: initial mask noise (0.01 / MNIST 0.05); ``noise_std_weak_dp`` under weak DP.
      mask_steps, mask_lr, mask_momentum, mask_weight_decay: mask SGD (30, 0.1, 0.9, 5e-4).
      ups_coef, norm_coef, lag_coef: mask-loss coefficients (0.1; 0.03 / 0.08; 0.01 / 0.1).
      lagrange_step: dual-ascent step (0.1).
      indicator_threshold: feedback threshold (1e-5 / MNIST 1e-4).
      clip_ratio: clipped if feedback <= ``clip_ratio`` * max feedback (0.8).
      indicator_scale: indicator magnification (1e5).
      indicator_zero_value: indicator value where the magnified entry is 0 (1e-3 / 1e-2).
      num_candidate: candidate positions per indicator (10).
      candidate_ratio: share of accepted members that makes a group a candidate (0.8).
      alpha_step: width of the ``α`` draw when only some groups are candidates (0.1).
      alpha_range: clamp of ``α`` (0.01, 0.99).
      weak_dp_alpha: ``α`` under weak DP (0.1).
      max_decoys: static cap of the decoy count.
      decoy_coef, decoy_limit: the decoy parameter loss (10, 10).
      decoy_epochs, decoy_lr: decoy training (default: the benign clients' epochs and lr).
      curvature_batches: batches of the curvature pass (default: one pass over the data).
      use_decoys, use_masks, use_indicators: switch modules off (ablations).
      use_tuning: ``False`` keeps the indicators (implanted and read back as feedback) but never
        tunes: every group's ``α`` stays at its first-round draw (``weak_dp_alpha`` once the
        weak-DP switch is on) and the decoy count at 0 (an ablation that separates the tuning
        from the implanted entries).
      indicator_layer, output_layer, decoy_layer: ``"a/b/kernel"`` paths inside ``params``.
    """
    check_common(lr, poison_epochs, poison_steps, data, batch_size)
    if constants not in CONSTANTS:
        raise ValueError(f"attack.options.constants must be one of {tuple(CONSTANTS)}")
    preset = CONSTANTS[constants]
    group_size = preset["group_size"] if group_size is None else group_size
    num_neurons = preset["num_neurons"] if num_neurons is None else num_neurons
    noise_std = preset["noise_std"] if noise_std is None else noise_std
    norm_coef = preset["norm_coef"] if norm_coef is None else norm_coef
    lag_coef = preset["lag_coef"] if lag_coef is None else lag_coef
    threshold = (
        preset["indicator_threshold"] if indicator_threshold is None else indicator_threshold
    )
    zero_value = (
        preset["indicator_zero_value"] if indicator_zero_value is None else indicator_zero_value
    )
    for name, v in (
        ("group_size", group_size),
        ("num_neurons", num_neurons),
        ("max_decoys", max_decoys + 1),
        ("num_candidate", num_candidate),
        ("mask_steps", mask_steps + 1),
    ):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"attack.options.{name} must be a positive integer, got {v}")
    if not max_scale >= 1:
        raise ValueError(f"attack.options.max_scale must be >= 1, got {max_scale}")
    if not (0 <= noise_mask_alpha < 1):
        raise ValueError(
            f"attack.options.noise_mask_alpha must be in [0, 1), got {noise_mask_alpha}"
        )
    lo_a, hi_a = alpha_range
    if not (0 <= lo_a <= hi_a <= 1):
        raise ValueError(
            f"attack.options.alpha_range must satisfy 0 <= lo <= hi <= 1, got {alpha_range}"
        )
    if ctx.num_classes < 2:
        raise ValueError("3DFed needs at least 2 classes")

    x0 = jax.ShapeDtypeStruct((1, *ctx.image_shape), jnp.float32)
    find_layers(  # fail at build time, naming the option, if a layer is missing
        jax.eval_shape(ctx.model.init, jax.random.key(0), x0)["params"],
        indicator_layer,
        output_layer,
        decoy_layer,
    )
    t = ctx.train
    bs = batch_size or t.batch_size
    num_slots_att = max(1, min(ctx.clients_per_round, ctx.num_attackers))  # A
    num_decoy_slots = max_decoys if use_decoys else 0  # K
    num_slots = num_slots_att + num_decoy_slots  # S
    num_groups = math.ceil(num_slots_att / group_size)  # G
    slot_group = jnp.arange(num_slots_att, dtype=jnp.int32) // group_size
    stamp = stamp_fn(ctx)

    train_bd = make_backdoor_trainer(
        ctx,
        make_blind_loss(ctx, tuple(float(w) for w in loss_weights)),
        lr=lr,
        epochs=poison_epochs,
        steps=poison_steps,
        batch_size=batch_size,
    )

    def layers_of(variables):
        return find_layers(variables["params"], indicator_layer, output_layer, decoy_layer)

    # Decoys: (CE + param_loss) / 2, aux = (flat position, reference value).
    def decoy_loss(paths):
        def loss_fn(params, batch_stats, x, y, key, aux):
            pos, ref = aux
            logits, new_bs = forward(ctx.model, ctx.normalize, params, batch_stats, x)
            w = get_path(params, paths["decoy"]).reshape(-1)[pos]
            pl = C.decoy_param_loss(w, ref, decoy_coef, decoy_limit)
            return 0.5 * (cross_entropy_loss(logits, y) + pl), new_bs

        return loss_fn

    def init(global_variables: Variables) -> ThreeDFedState:
        paths = layers_of(global_variables)
        ind = get_path(global_variables["params"], paths["indicator"]).reshape(-1)
        return ThreeDFedState(
            last_indicator=jnp.asarray(ind, jnp.float32),
            positions=jnp.zeros((num_slots,), jnp.int32),
            values=jnp.zeros((num_slots,), jnp.float32),
            uploaded=jnp.zeros((num_slots,), bool),
            status=jnp.zeros((num_slots,), jnp.int32),
            feedback=jnp.zeros((num_slots,), jnp.float32),
            num_decoys=jnp.int32(0),
            alpha=jnp.zeros((num_groups,), jnp.float32),
            weak_dp=jnp.asarray(False),
            attack_rounds=jnp.int32(0),
            scale=jnp.float32(1.0),
        )

    def curvature(variables, paths, data_, idx, count, nb):
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        ppath = paths["indicator"]
        w0 = get_path(params, ppath)
        safe = jnp.maximum(count, 1)

        def body(i, acc):
            pos = (i * bs + jnp.arange(bs)) % safe
            sample = idx[pos]
            x, y = data_.x[sample], data_.y[sample]
            px, py = stamp(x, y)

            def loss(w):
                p = set_path(params, ppath, w)
                lc, _ = forward(ctx.model, ctx.normalize, p, batch_stats, x)
                lb, _ = forward(ctx.model, ctx.normalize, p, batch_stats, px)
                return cross_entropy_loss(lc, y) + cross_entropy_loss(lb, py)

            return acc + C.layer_curvature(loss, w0)

        return jax.lax.fori_loop(0, nb, body, jnp.zeros_like(w0)).reshape(-1)

    def craft(key, updates, state: ThreeDFedState, c: CraftContext):
        k_train, k_alpha, k_first, k_neur, k_mask, k_dec = jax.random.split(key, 6)
        g = c.global_variables
        paths = layers_of(g)
        mal = c.is_malicious
        n = mal.shape[0]
        rank = attacker_ranks(c.client_ids, mal)
        n_adv = jnp.sum(mal).astype(jnp.int32)
        safe_rank = jnp.clip(rank, 0, num_slots_att - 1)

        # 1. Shared constrained backdoor training.
        idx, count, ref_row = attacker_data(c, data)
        trained, _ = train_bd(g, k_train, c.data, idx, count, g["params"])
        delta_raw = tree_sub(trained, g)
        delta_ben = jax.tree.map(lambda u: u[ref_row], updates)

        # 2. Indicator feedback.
        ind_g = get_path(g["params"], paths["indicator"]).reshape(-1).astype(jnp.float32)
        started = state.attack_rounds > 0
        if use_indicators:
            fb = C.indicator_feedback(ind_g - state.last_indicator, state.positions, state.values)
            status, weak_now = C.indicator_status(
                fb, state.uploaded & started, threshold, clip_ratio
            )
        else:
            fb = jnp.zeros_like(state.values)
            status, weak_now = jnp.zeros_like(state.status), jnp.asarray(False)
        weak_dp = state.weak_dp | (started & weak_now)

        # 3. Adaptive tuning.
        att_status, dec_status = status[:num_slots_att], status[num_slots_att:]
        k_tuned = C.tune_decoys(state.num_decoys, att_status, dec_status, num_decoy_slots)
        a_tuned = C.tune_alpha(
            k_alpha,
            state.alpha,
            att_status,
            slot_group,
            candidate_ratio=candidate_ratio,
            alpha_low=noise_mask_alpha,
            step=alpha_step,
            alpha_min=lo_a,
            alpha_max=hi_a,
        )
        a_first = jnp.clip(jax.random.uniform(k_first, (num_groups,)), lo_a, hi_a)
        tuning = started & ~weak_dp & use_indicators & use_tuning
        alpha = jnp.where(
            weak_dp,
            weak_dp_alpha,
            jnp.where(tuning, a_tuned, jnp.where(started, state.alpha, a_first)),
        ).astype(jnp.float32)
        if not use_indicators:
            alpha = a_first
        k = (
            jnp.where(tuning, k_tuned, state.num_decoys).astype(jnp.int32)
            if use_decoys
            else jnp.int32(0)
        )

        # 4. Norm matching to the benign reference.
        scale = C.norm_match_scale(params_norm(delta_ben), params_norm(delta_raw), max_scale)
        delta_bd = jax.tree.map(lambda d: d * scale.astype(d.dtype), delta_raw)

        # 5. Indicator positions.
        d_ind = get_path(delta_bd["params"], paths["indicator"]).reshape(-1)
        if use_indicators:
            b_ind = get_path(delta_ben["params"], paths["indicator"]).reshape(-1)
            analog = jnp.abs(d_ind) + jnp.abs(b_ind)
            per_epoch = (count + bs - 1) // bs
            nb = (
                per_epoch
                if curvature_batches is None
                else jnp.minimum(per_epoch, curvature_batches)
            )
            curv = curvature(trained, paths, c.data, idx, count, nb)
            positions = C.choose_indicator_positions(
                analog, curv, n_adv + k, num_candidate=num_candidate, max_positions=num_slots
            )
        else:
            positions = jnp.zeros((num_slots,), jnp.int32)

        # 6. Noise masks and the attackers' uploads.
        out = updates
        out = write_rows(out, mal, delta_bd)
        if use_masks:
            ow_path = ("params",) + paths["output"]
            dw = get_path(delta_bd, ow_path)
            if paths["output_bias"] is not None:
                ob_path = ("params",) + paths["output_bias"]
                db = get_path(delta_bd, ob_path)
            else:
                db = jnp.zeros((dw.shape[1],), dw.dtype)
            neurons = C.choose_neurons(
                k_neur, num_groups, dw.shape[1], num_neurons, ctx.target_label
            )
            member = jnp.arange(num_slots_att) < n_adv
            nm = neurons[slot_group]
            std = jnp.where(weak_dp, noise_std_weak_dp, noise_std)
            masks = C.init_noise_masks(k_mask, nm, member, slot_group, dw.shape[0], 1.0, num_groups)
            masks = jax.tree.map(lambda m: m * std, masks)
            (mw, mb), _ = C.optimize_noise_masks(
                masks,
                dw,
                db,
                nm,
                member,
                slot_group,
                alpha[slot_group],
                num_groups,
                steps=mask_steps,
                lr=mask_lr,
                momentum=mask_momentum,
                weight_decay=mask_weight_decay,
                ups_coef=ups_coef,
                norm_coef=norm_coef,
                lag_coef=lag_coef,
                lagrange_step=lagrange_step,
            )
            m3 = mal[:, None, None]
            ow = get_path(out, ow_path)
            out = set_path(out, ow_path, jnp.where(m3, ow + mw[safe_rank].astype(ow.dtype), ow))
            if paths["output_bias"] is not None:
                ob = get_path(out, ob_path)
                out = set_path(
                    out, ob_path, jnp.where(mal[:, None], ob + mb[safe_rank].astype(ob.dtype), ob)
                )

        ip = ("params",) + paths["indicator"]
        rows = jnp.arange(n)
        values = jnp.zeros((num_slots,), jnp.float32)
        uploaded = jnp.zeros((num_slots,), bool)
        if use_indicators:
            iw = get_path(out, ip)
            flat = iw.reshape(n, -1)
            pos_rows = positions[safe_rank]
            v_rows = C.implant_value(d_ind[pos_rows], indicator_scale, zero_value).astype(
                flat.dtype
            )
            flat = flat.at[rows, pos_rows].set(jnp.where(mal, v_rows, flat[rows, pos_rows]))
            out = set_path(out, ip, flat.reshape(iw.shape))
            slot_ok = jnp.arange(num_slots_att) < n_adv
            v_att = C.implant_value(d_ind[positions[:num_slots_att]], indicator_scale, zero_value)
            values = values.at[:num_slots_att].set(jnp.where(slot_ok, v_att, 0.0))
            uploaded = uploaded.at[:num_slots_att].set(slot_ok)
        state_positions = positions
        if use_indicators and num_decoy_slots:
            dec_pos_ind = positions[jnp.clip(n_adv + jnp.arange(num_decoy_slots), 0, num_slots - 1)]
            state_positions = positions.at[num_slots_att:].set(dec_pos_ind)

        # 7. Decoys in the rows of benign clients num_clients - 1 - i, if sampled.
        if num_decoy_slots:
            dpath = paths["decoy"]
            dpos = C.decoy_positions(
                get_path(delta_bd["params"], dpath),
                get_path(delta_ben["params"], dpath),
                num_decoy_slots,
            )
            w_ref = (get_path(g["params"], dpath) + get_path(delta_ben["params"], dpath)).reshape(
                -1
            )
            train_dec = make_local_train(
                ctx.model,
                ctx.normalize,
                lr=decoy_lr or t.lr,
                momentum=t.momentum,
                weight_decay=t.weight_decay,
                batch_size=t.batch_size,
                epochs=decoy_epochs or t.local_epochs,
                steps=t.local_steps if decoy_epochs is None else None,
                drop_last=t.drop_last,
                loss_fn=decoy_loss(paths),
            )
            dec_keys = jax.random.split(k_dec, num_decoy_slots)

            def one_decoy(i, carry):
                out, values, uploaded = carry
                row_hit = (c.client_ids == ctx.num_clients - 1 - i) & ~mal
                active = (i < k) & jnp.any(row_hit)

                def do(carry):
                    out, values, uploaded = carry
                    trained_d, _ = train_dec(
                        g, dec_keys[i], c.data, idx, count, (dpos[i], w_ref[dpos[i]])
                    )
                    dd = tree_sub(trained_d, g)
                    if use_indicators:
                        dflat = get_path(dd, ip).reshape(-1)
                        p = state_positions[num_slots_att + i]
                        v = C.implant_value(dflat[p], indicator_scale, zero_value)
                        dd = set_path(dd, ip, dflat.at[p].set(v).reshape(get_path(dd, ip).shape))
                        values = values.at[num_slots_att + i].set(v.astype(jnp.float32))
                        uploaded = uploaded.at[num_slots_att + i].set(True)
                    return write_rows(out, row_hit, dd), values, uploaded

                return jax.lax.cond(active, do, lambda cc: cc, (out, values, uploaded))

            out, values, uploaded = jax.lax.fori_loop(
                0, num_decoy_slots, one_decoy, (out, values, uploaded)
            )

        new_state = ThreeDFedState(
            last_indicator=ind_g,
            positions=state_positions,
            values=values,
            uploaded=uploaded,
            status=status,
            feedback=fb.astype(jnp.float32),
            num_decoys=jnp.asarray(k, jnp.int32),
            alpha=alpha,
            weak_dp=jnp.asarray(weak_dp),
            attack_rounds=state.attack_rounds + 1,
            scale=scale.astype(jnp.float32),
        )
        return out, new_state

    return Attack(init, identity_poison, craft, pattern_trigger_fn(ctx))
