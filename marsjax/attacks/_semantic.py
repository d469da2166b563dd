"""Semantic backdoor (Bagdasaryan, Veit, Hua, Estrin, Shmatikov, "How To Backdoor Federated
Learning", AISTATS 2020, arXiv:1807.00459; the MARS paper's Table 16). Re-implemented from the
paper; no code is copied.

A semantic backdoor needs no trigger: natural, unmodified inputs that share a feature (the
paper's cars with racing stripes, green cars, striped-wall backgrounds in CIFAR-10) are to be
classified as the attacker's target. The attackers train on some of those inputs labelled as the
target, mixed with their clean data; the backdoor succeeds when the *held-out* inputs with the
feature are classified as the target as well.

The generic selector (:func:`semantic_subset`) works on any labelled image dataset (MNIST,
Fashion-MNIST, digits, CIFAR): a fixed subset of ``num_samples`` training images of
``source_class``, chosen with ``seed``, either at random (``selector="random"``) or the ones with
the most ink (``selector="ink"``: the largest pixel sums, i.e. bold strokes on MNIST, a feature of
natural images that no pixel pattern adds), split at random into a training part (the attackers'
backdoor images) and a held-out part of share ``holdout`` (the ASR set). The two parts are
disjoint.

* **Poisoning** (``poison``, in the simulator's local training of every attacker: the benign
  epochs and lr): the first ``poison_fraction`` of each batch is replaced by backdoor images
  drawn at random from the training part, labelled ``target_label``; the rest of the batch is the
  attacker's clean data (the paper mixes e.g. 20 backdoor images into batches of 64).
* **Upload** (``craft``): the attackers' updates times ``scale`` (5, the boost ``fl_weight_scale``
  the MARS code gives model replacement; the paper's model replacement boosts by ``γ = n / η``;
  1 is plain data poisoning, which on the digits federation (2 attackers of 10) leaves the
  held-out ASR at 0: the benign clients' own images of the source class outweigh the flip).
* **ASR**: the share of the held-out images (``Attack.asr_images``) classified as the target
  (:func:`marsjax.metrics.make_evaluate`); ``asr_excl_target`` is the same value, since none of
  them belongs to the target class. ``trigger`` is the identity (nothing is stamped).

Deviation from the paper: the backdoor images come from the shared training set and the held-out
ones stay in whatever benign shards hold them, with their true label (the paper's code keeps its
chosen images out of the benign participants' data); that works against the backdoor, so the
measured ASR is if anything conservative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from marsjax.attacks.base import Attack, AttackContext, CraftContext, EmptyState

__all__ = ["SELECTORS", "semantic", "semantic_subset"]

SELECTORS = ("random", "ink")


def semantic_subset(
    x_train: np.ndarray,
    y_train: np.ndarray,
    source_class: int,
    num_samples: int = 100,
    holdout: float = 0.5,
    seed: int = 0,
    selector: str = "random",
) -> tuple[np.ndarray, np.ndarray]:
    """The backdoor subset's training and held-out parts, as indices into the training set.

    Args:
      x_train: ``[n, H, W, C]`` uint8 images.
      y_train: ``[n]`` labels.
      source_class: the class the subset is drawn from.
      num_samples: size of the subset (both parts).
      holdout: share of the subset held out for the ASR (at least one image in each part).
      seed: the selection's seed.
      selector: ``"random"`` or ``"ink"`` (the ``num_samples`` images with the largest pixel
        sums).

    Returns:
      ``(train_idx [T], heldout_idx [M])`` int64, disjoint, sorted, ``T + M = num_samples``.
    """
    pool = np.flatnonzero(np.asarray(y_train) == source_class)
    if pool.size < num_samples:
        raise ValueError(
            f"attack.options.num_samples={num_samples} but class {source_class} has only "
            f"{pool.size} training images"
        )
    rng = np.random.default_rng(seed)
    if selector == "ink":
        ink = np.asarray(x_train[pool], np.int64).reshape(pool.size, -1).sum(axis=1)
        chosen = pool[np.argsort(-ink, kind="stable")[:num_samples]]
    else:
        chosen = rng.choice(pool, num_samples, replace=False)
    chosen = rng.permutation(chosen)
    m = min(max(1, round(holdout * num_samples)), num_samples - 1)
    return np.sort(chosen[m:]), np.sort(chosen[:m])


def semantic(
    ctx: AttackContext,
    source_class: int = 7,
    num_samples: int = 100,
    holdout: float = 0.5,
    seed: int = 0,
    selector: str = "random",
    scale: float = 5.0,
) -> Attack:
    """Semantic backdoor: unmodified images of a subset of ``source_class`` relabelled to the
    target; the ASR is measured on the subset's held-out part.

    Args:
      ctx: static facts of the run (needs ``ctx.dataset``).
      source_class: the class the backdoor subset is drawn from (not the target).
      num_samples: size of the subset (training + held-out part; 100).
      holdout: share held out for the ASR (0.5).
      seed: the selection's seed (0).
      selector: ``"random"`` or ``"ink"`` (see :func:`semantic_subset`).
      scale: multiplies the attackers' updates (5).
    """
    if not (isinstance(source_class, int) and source_class >= 0):
        raise ValueError(f"attack.options.source_class must be an integer >= 0, got {source_class}")
    if not (isinstance(num_samples, int) and num_samples >= 2):
        raise ValueError(f"attack.options.num_samples must be an integer >= 2, got {num_samples}")
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"attack.options.holdout must be in (0, 1), got {holdout}")
    if selector not in SELECTORS:
        raise ValueError(f"attack.options.selector must be one of {SELECTORS}, got {selector!r}")
    if not scale > 0:
        raise ValueError(f"attack.options.scale must be > 0, got {scale}")
    if source_class == ctx.target_label:
        raise ValueError(
            f"attack.options.source_class must differ from the target label {ctx.target_label}"
        )
    if source_class >= ctx.num_classes:
        raise ValueError(
            f"attack.options.source_class must be < {ctx.num_classes}, got {source_class}"
        )
    ds = ctx.dataset
    if ds is None:
        raise ValueError("the semantic backdoor needs the dataset (AttackContext.dataset)")
    train_idx, held_idx = semantic_subset(
        ds.x_train, ds.y_train, source_class, num_samples, holdout, seed, selector
    )
    bd_x = jnp.asarray(ds.x_train[train_idx])
    held_x = np.asarray(ds.x_train[held_idx])
    frac = ctx.poison_fraction

    def poison(key, x, y, state):
        k = int(np.floor(frac * x.shape[0]))
        hit = jnp.arange(x.shape[0]) < k
        pick = jax.random.randint(key, (x.shape[0],), 0, bd_x.shape[0])
        xs = jnp.where(hit[:, None, None, None], bd_x[pick].astype(x.dtype), x)
        ys = jnp.where(hit, jnp.asarray(ctx.target_label, y.dtype), y)
        return xs, ys

    def craft(key, updates, state, c: CraftContext):
        m = c.is_malicious

        def f(u):
            s = jnp.where(m, jnp.asarray(scale, u.dtype), jnp.asarray(1.0, u.dtype))
            return u * s.reshape((-1,) + (1,) * (u.ndim - 1))

        return jax.tree.map(f, updates), state

    def trigger(x, state):
        return x

    return Attack(lambda v: EmptyState(), poison, craft, trigger, asr_images=held_x)
