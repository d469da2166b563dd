"""BackdoorIndicator: an indicator task on out-of-distribution data, planted by the server.

Li & Dai, "BackdoorIndicator: Leveraging OOD Data for Proactive Backdoor Detection in Federated
Learning", USENIX Security 2024, arXiv:2405.20862 (the MARS paper's Table 4 baseline).

The server plants an *indicator task* in the global model: OOD images, each assigned one of the
``C`` labels (balanced), are learned by the global model. Benign training on in-distribution data
makes the local models forget it; a backdoor is itself an OOD task with a fixed target label, and
training it keeps the indicator samples of that label alive. Per uploaded model the server
measures the accuracy on the indicator samples of every label, with the BatchNorm statistics of
the global model right after the implant ("BN correction"), and flags the model when the best
per-label accuracy reaches ``threshold`` (85% in the authors' configs).

Settings follow the authors' public configuration: 800 OOD samples (768 used, whole batches of
64) mixed as ``0.8 * x + 0.2 * N(0, 1.5^2)`` in normalised input space, fixed balanced labels, 50
epochs of SGD (lr 0.0008, momentum 0.9, weight decay 5e-4) on ``CE + (mu / 2) * ||theta -
theta_0||_2`` with ``mu = 0.1``, BN in training mode; accepted updates are averaged (norm clipping
off, ``clip=True`` clips to the median norm).

**OOD data shipped offline.** The paper uses GTSRB or CIFAR-100 for CIFAR-10. marsjax ships no
such set, so the default ``ood_source="sample_images"`` takes random crops (resized to the task's
``H x W``; grey by luma for 1 channel) of the two photographs bundled with scikit-learn
(``sklearn.datasets.load_sample_images``: a temple in China and a flower). Photo patches of
buildings, sky and petals belong to none of the classes of digits, MNIST, Fashion-MNIST or
CIFAR-10/100, and their statistics differ from every one of those sets, which is what the
indicator needs. ``"noise"`` uses uniform random images instead.

**Where the indicator is planted.** The method plants it in the model the server broadcasts. The
marsjax round applies ``global += scale * update`` after the defense, and has no broadcast hook,
so this defense plants the indicator at the end of round ``t`` through its returned update:
``update = agg + delta / scale``, where ``delta`` is the implant on ``global + scale * agg`` and
``scale`` the server rule's factor (``DefenseContext.server_rule``/``server_lr``/``eta``, which
the simulator fills from ``run``; the options of the same names override them). Under the
official ``sum`` rule the factor is ``eta / num_clients`` times the accepted weight, e.g. about
0.13 with 16 of 20 clients accepted out of 100, and the implant is divided by it. The model that clients receive in round
``t + 1`` is exactly the paper's; the first round has no indicator yet, so round 0 accepts every
valid upload. ACC/ASR are then measured on models that carry the indicator, as the paper's
broadcast models do.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from marsjax.aggregation import rule_scale
from marsjax.client import sgd
from marsjax.defenses._robust_utils import (
    clip_factors,
    finish,
    masked_median,
    masked_weighted_mean,
    prepare,
    row_norms,
    scale_params_rows,
    selected_rows,
)
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult

__all__ = ["IndicatorState", "backdoor_indicator", "indicator_accuracy", "ood_images"]


class IndicatorState(NamedTuple):
    """``implanted``: whether the current global model carries the indicator task."""

    implanted: jax.Array


def ood_images(
    num: int, image_shape: tuple[int, int, int], source: str = "sample_images", seed: int = 0
) -> np.ndarray:
    """``[num, H, W, C]`` uint8 out-of-distribution images, built offline on the host.

    Args:
      num: number of images.
      image_shape: ``(H, W, C)`` with ``C`` 1 or 3.
      source: ``"sample_images"`` (random crops of scikit-learn's two bundled photographs) or
        ``"noise"`` (uniform random pixels).
      seed: numpy seed.
    """
    h, w, c = image_shape
    rng = np.random.default_rng(seed)
    if source == "noise":
        return rng.integers(0, 256, (num, h, w, c), dtype=np.uint8)
    if source != "sample_images":
        raise ValueError(f"ood_source must be 'sample_images' or 'noise', got {source!r}")
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    out = np.empty((num, h, w, c), np.uint8)
    for i in range(num):
        img = photos[rng.integers(len(photos))]
        side = int(rng.integers(max(h, w), min(img.shape[:2]) // 2 + 1))
        top = int(rng.integers(0, img.shape[0] - side + 1))
        left = int(rng.integers(0, img.shape[1] - side + 1))
        patch = Image.fromarray(img[top : top + side, left : left + side])
        if c == 1:
            patch = patch.convert("L")
        arr = np.asarray(patch.resize((w, h), Image.BILINEAR), np.uint8)
        out[i] = arr.reshape(h, w, c) if c == 1 else arr[..., :c]
    return out


def indicator_accuracy(logits: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
    """Best per-label accuracy on the indicator samples (``max_l acc_l``), in ``[0, 1]``."""
    hit = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    oh = jax.nn.one_hot(labels, num_classes)
    per = jnp.sum(oh * hit[:, None], 0) / jnp.maximum(jnp.sum(oh, 0), 1.0)
    return jnp.max(jnp.where(jnp.sum(oh, 0) > 0, per, 0.0))


def backdoor_indicator(
    model: Any,
    normalize,
    ood_x,
    num_classes: int,
    *,
    threshold: float = 0.85,
    num_used: int | None = None,
    batch_size: int = 64,
    epochs: int = 50,
    lr: float = 0.0008,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    mu: float = 0.1,
    noise_percent: float = 0.2,
    noise_scale: float = 1.5,
    clip: bool = False,
    server_rule: str = "mean",
    server_lr: float = 1.0,
    eta: float = 0.8,
    num_clients: int = 100,
    seed: int = 0,
) -> Defense:
    """BackdoorIndicator.

    Args:
      model, normalize: the flax module and its uint8 -> input map.
      ood_x: ``[n, H, W, C]`` uint8 OOD images (see :func:`ood_images`).
      num_classes: ``C``; the indicator labels are balanced over ``0 .. C-1``.
      threshold: flag a model whose best per-label indicator accuracy is ``>= threshold``.
      num_used: OOD samples used (default: whole batches of ``batch_size``).
      batch_size, epochs, lr, momentum, weight_decay, mu: the implant's training.
      noise_percent, noise_scale: OOD inputs are ``(1 - p) * x + p * N(0, scale^2)``.
      clip: clip the accepted updates to the median norm before averaging.
      server_rule, server_lr, eta, num_clients: the simulator's server rule (to plant the
        indicator through the returned update; see the module docstring).
      seed: labels and input noise.
    """
    if server_rule not in ("mean", "sum"):
        raise ValueError(f"server_rule must be 'mean' or 'sum', got {server_rule!r}")
    ood_x = np.asarray(ood_x)
    n = (ood_x.shape[0] // batch_size) * batch_size if num_used is None else int(num_used)
    if n < 1:
        raise ValueError("not enough OOD samples for one batch")
    rng = np.random.default_rng(seed)
    labels = np.resize(np.arange(num_classes), n)
    rng.shuffle(labels)
    x = np.asarray(normalize(jnp.asarray(ood_x[:n])), np.float32)
    x = (1.0 - noise_percent) * x + noise_percent * noise_scale * rng.standard_normal(x.shape)
    x_ind = jnp.asarray(x, jnp.float32)
    y_ind = jnp.asarray(labels, jnp.int32)
    bs = min(batch_size, n)
    nb = n // bs
    steps = epochs * nb
    opt = sgd(lr, momentum, weight_decay)

    def logits_of(variables, xs):
        return model.apply(variables, xs, train=False)

    def implant(variables):
        params0 = variables["params"]
        has_bn = "batch_stats" in variables

        def loss_fn(params, bstats, xb, yb):
            v = {"params": params}
            if has_bn:
                v["batch_stats"] = bstats
                out, new = model.apply(v, xb, train=True, mutable=["batch_stats"])
                new_bs = new["batch_stats"]
            else:
                out, new_bs = model.apply(v, xb, train=True), bstats
            ce = optax.softmax_cross_entropy_with_integer_labels(out, yb).mean()
            diff = jax.tree.map(lambda a, b: a - b, params, params0)
            dist = jnp.sqrt(sum(jnp.sum(jnp.square(d)) for d in jax.tree.leaves(diff)) + 1e-24)
            return ce + 0.5 * mu * dist, new_bs

        grad_fn = jax.grad(loss_fn, has_aux=True)

        def step(i, carry):
            params, bstats, ostate = carry
            b = i % nb
            xb = jax.lax.dynamic_slice_in_dim(x_ind, b * bs, bs)
            yb = jax.lax.dynamic_slice_in_dim(y_ind, b * bs, bs)
            grads, bstats = grad_fn(params, bstats, xb, yb)
            upd, ostate = opt.update(grads, ostate, params)
            return optax.apply_updates(params, upd), bstats, ostate

        bstats0 = variables.get("batch_stats", {})
        params, bstats, _ = jax.lax.fori_loop(0, steps, step, (params0, bstats0, opt.init(params0)))
        out = dict(variables)
        out["params"] = params
        if has_bn:
            out["batch_stats"] = bstats
        return out

    def init(global_variables):
        return IndicatorState(jnp.bool_(False))

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del key, client_ids
        valid, clean, w = prepare(updates, client_weights)

        def bia(delta):
            v = dict(global_variables)
            v["params"] = jax.tree.map(
                lambda g, d: g + d, global_variables["params"], delta["params"]
            )
            return indicator_accuracy(logits_of(v, x_ind), y_ind, num_classes)

        acc = jax.lax.map(bia, clean)
        flagged = state.implanted & (acc >= threshold)
        accepted = valid & ~flagged
        if clip:
            norms = row_norms(selected_rows(clean, "params"))
            clean_c = scale_params_rows(clean, clip_factors(norms, masked_median(norms, valid)))
        else:
            clean_c = clean
        agg = masked_weighted_mean(clean_c, w * accepted)
        # The factor the round will apply (simulation: rule_scale of the accepted weight).
        scale = rule_scale(
            server_rule,
            jnp.sum(accepted * (w > 0)),
            server_lr=server_lr,
            eta=eta,
            num_clients=num_clients,
        )
        ok = scale > 0
        safe = jnp.where(ok, scale, 1.0)
        m = jax.tree.map(lambda g, a: g + safe * a, global_variables, agg)
        planted = implant(m)
        ok = ok & jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(planted)]))
        update = jax.tree.map(lambda a, p, q: jnp.where(ok, a + (p - q) / safe, a), agg, planted, m)
        accepted, scores = finish(accepted.astype(jnp.float32), acc, valid)
        return DefenseResult(update, accepted, scores), IndicatorState(state.implanted | ok)

    return Defense(init, apply)


def _build(
    ctx: DefenseContext,
    ood_source: str = "sample_images",
    num_ood: int = 800,
    threshold: float = 0.85,
    batch_size: int = 64,
    epochs: int = 50,
    lr: float = 0.0008,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    mu: float = 0.1,
    noise_percent: float = 0.2,
    noise_scale: float = 1.5,
    clip: bool = False,
    server_rule: str | None = None,
    server_lr: float | None = None,
    eta: float | None = None,
    seed: int = 0,
) -> Defense:
    return backdoor_indicator(
        ctx.model,
        ctx.normalize,
        ood_images(num_ood, ctx.image_shape, ood_source, seed),
        ctx.num_classes,
        threshold=threshold,
        batch_size=batch_size,
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        mu=mu,
        noise_percent=noise_percent,
        noise_scale=noise_scale,
        clip=clip,
        server_rule=ctx.server_rule if server_rule is None else server_rule,
        server_lr=ctx.server_lr if server_lr is None else server_lr,
        eta=ctx.eta if eta is None else eta,
        num_clients=ctx.num_clients,
        seed=seed,
    )
