"""DeepSight: deep model inspection (DDifs, NEUPs, threshold exceedings), clustering, clipping.

Rieger, Nguyen, Miettinen & Sadeghi, "DeepSight: Mitigating Backdoor Attacks in Federated Learning
Through Deep Model Inspection", NDSS 2022, arXiv:2201.00763. Settings of the MARS baselines
(mars_spec §2.4): 3 seeds of 20,000 random inputs, ``tau = 1/3``.

Per round:

1. **NEUPs** from the output layer's update: ``UP_k = |db_k| + sum_j |dW_jk|``,
   ``NEUP_k = UP_k^2 / sum UP^2``. **Threshold exceedings** ``TE = #{k: NEUP_k >= max(0.01, 1/C) *
   max NEUP}``; a model is labelled *suspicious* when ``TE < median(TE) / 2`` (a backdoor trains on
   few labels, so fewer output neurons move).
2. **DDifs**: for each seed, random uint8 images (normalised like the data) are fed to the local
   model and the global model (inference mode); ``DDif_k = mean_x p_local(k|x) / p_global(k|x)``.
3. **Clustering**: HDBSCAN (``min_samples=1``, ``allow_single_cluster=True``) separately on the
   cosine distances of the output-layer bias updates, on the NEUPs and on each seed's DDifs; each
   clustering gives a 0/1 "different cluster" matrix (a noise point is its own cluster), the
   matrices are averaged (DDif seeds first) and clustered once more with HDBSCAN (precomputed).
4. **Filtering**: a cluster is accepted when less than ``tau`` of its members are suspicious; a
   noise point when it is not suspicious itself.
5. **Clipping**: the accepted updates are clipped to the median L2 norm of all updates and
   averaged.

All HDBSCAN runs happen in one host callback (:class:`sklearn.cluster.HDBSCAN` via
``jax.pure_callback``); NEUPs, DDifs (the forward passes), distances and clipping are JAX.

Deviations: the public implementations (3DFed, BackdoorIndicator) have bugs in this defense (a
global output that is a module, an all-ones distance matrix, noise points merged into one
cluster); this follows the paper. The MARS code's compiled baseline
(``defenses/__pycache__/deepsight.cpython-38.pyc``, read by disassembly) has two more, not
reproduced: its cosine distances are computed on the output layer of ONE model (the loop over the
clients loads each update file but reads the parameters of the ``local_model`` left over from
the DDif loop, so every row is the same model and all cosine distances are 0), and each seed's
DDifs are clustered flattened (``np.reshape(DDifs[i], (-1, 1))``: every client x class value is a
point of its own, instead of one point per client). The random inputs are drawn once per seed from
``jax.random.key(seed)`` (fixed across rounds, like the official seeding). ``scores`` is
``1 - TE / median(TE)`` (``>= 0.5`` means "suspicious").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from marsjax.defenses._robust_utils import (
    _hdbscan_host,
    clip_factors,
    cosine_similarity,
    find_output_layer,
    finish,
    masked_median,
    masked_weighted_mean,
    output_layer_name,
    prepare,
    row_norms,
    scale_params_rows,
    selected_rows,
)
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult, EmptyState

__all__ = ["ddifs", "deepsight", "neups_and_te"]


def neups_and_te(kernel_update: jax.Array, bias_update: jax.Array) -> tuple[jax.Array, jax.Array]:
    """NEUPs ``[N, C]`` and threshold exceedings ``[N]`` of output-layer updates.

    Args:
      kernel_update: ``[N, d_in, C]`` (flax Dense layout).
      bias_update: ``[N, C]``.
    """
    c = bias_update.shape[-1]
    up = jnp.abs(bias_update) + jnp.sum(jnp.abs(kernel_update), axis=-2)
    sq = jnp.square(up / jnp.maximum(jnp.max(up, axis=-1, keepdims=True), 1e-30))
    neup = sq / jnp.maximum(jnp.sum(sq, axis=-1, keepdims=True), 1e-30)
    thr = max(0.01, 1.0 / c) * jnp.max(neup, axis=-1, keepdims=True)
    te = jnp.sum(neup >= thr, axis=-1)
    return neup, te


def ddifs(
    model: Any,
    normalize,
    global_variables,
    updates,
    noise: jax.Array,
    *,
    batch_size: int = 500,
    client_chunk: int | None = None,
) -> jax.Array:
    """``[S, N, C]`` division differences ``mean_x p_i(k|x) / p_G(k|x)``.

    Args:
      model, normalize: the flax module and the uint8 -> input map.
      global_variables: the global model.
      updates: ``[N, ...]`` client updates (local model = global + update, BN statistics included).
      noise: ``[S, M, H, W, C]`` uint8 random images (``M`` a multiple of ``batch_size``).
      batch_size: forward batch.
      client_chunk: clients evaluated together (``lax.map`` batch size; ``None`` = one by one).
    """
    s, m = noise.shape[:2]
    nb = m // batch_size
    xb = noise.reshape(s, nb, batch_size, *noise.shape[2:])

    def probs(variables, x):
        return jax.nn.softmax(model.apply(variables, normalize(x), train=False).astype(jnp.float32))

    pg = jax.lax.map(lambda xs: jax.lax.map(lambda x: probs(global_variables, x), xs), xb)
    inv = 1.0 / (pg + 1e-30)  # [S, nb, B, C]

    def one_client(delta):
        local = jax.tree.map(lambda g, d: g + d, global_variables, delta)

        def per_batch(args):
            x, iv = args
            return jnp.sum(probs(local, x) * iv, axis=0)

        out = jax.lax.map(lambda a: jax.lax.map(per_batch, a), (xb, inv))  # [S, nb, C]
        return jnp.sum(out, axis=1) / m

    out = jax.lax.map(one_client, updates, batch_size=client_chunk)  # [N, S, C]
    return jnp.transpose(out, (1, 0, 2))


def _cluster_dists(labels: np.ndarray) -> np.ndarray:
    n = labels.shape[0]
    lab = labels.copy()
    noise = lab < 0
    lab[noise] = -(np.arange(n)[noise] + 10)  # every noise point its own cluster
    return (lab[:, None] != lab[None, :]).astype(np.float64)


def _deepsight_host(
    dd, neup, cd, suspicious, valid, *, tau: float, min_cluster_size: int
) -> np.ndarray:
    """Host side: the four clusterings, the merged clustering and the tau rule -> accepted."""
    dd, neup, cd = np.asarray(dd), np.asarray(neup), np.asarray(cd)
    suspicious, valid = np.asarray(suspicious, bool), np.asarray(valid, bool)
    n = valid.shape[0]
    kw = {"min_cluster_size": min_cluster_size, "min_samples": 1, "allow_single_cluster": True}
    accepted = np.zeros((n,), np.float32)
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return accepted
    sub_valid = np.ones((idx.size,), bool)

    def labels(data, metric):
        return _hdbscan_host(data, sub_valid, metric=metric, **kw)

    cos_d = _cluster_dists(labels(cd[np.ix_(idx, idx)], "precomputed"))
    neup_d = _cluster_dists(labels(neup[idx], "euclidean"))
    dd_d = np.mean([_cluster_dists(labels(d[idx], "euclidean")) for d in dd], axis=0)
    merged = (dd_d + neup_d + cos_d) / 3.0
    final = labels(merged, "precomputed")
    sus = suspicious[idx]
    ok = np.zeros((idx.size,), bool)
    for c in np.unique(final):
        members = final == c
        if c < 0:
            ok[members] = ~sus[members]
        else:
            ok[members] = sus[members].mean() < tau
    accepted[idx] = ok.astype(np.float32)
    return accepted


def deepsight(
    model: Any,
    normalize,
    image_shape: tuple[int, int, int],
    *,
    num_seeds: int = 3,
    num_samples: int = 20000,
    tau: float = 1.0 / 3.0,
    min_cluster_size: int = 5,
    batch_size: int = 500,
    client_chunk: int | None = None,
    output_layer: str | None = None,
) -> Defense:
    """DeepSight.

    Args:
      model, normalize: the flax module and its input normalisation (DDifs run the models).
      image_shape: ``(H, W, C)`` of the random inputs.
      num_seeds: DDif seeds.
      num_samples: random inputs per seed (the paper and the MARS baselines: 20,000; the cost is
        ``num_seeds * num_samples`` forward passes per client and round).
      tau: a cluster with a suspicious share ``>= tau`` is rejected.
      min_cluster_size: HDBSCAN's (the ``hdbscan`` package default used by the public code: 5;
        fewer alike attackers than this can never form a cluster of their own).
      batch_size: forward batch (``num_samples`` is rounded up to a multiple).
      client_chunk: clients whose DDifs are computed together.
      output_layer: the output layer's name (auto-detected if ``None``).
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    bs = int(min(batch_size, num_samples))
    m = -(-int(num_samples) // bs) * bs

    def noise_images():
        # Drawn inside the compiled round from fixed keys (no large constant in the program).
        return jnp.stack(
            [
                jax.random.randint(jax.random.key(s), (m, *image_shape), 0, 256).astype(jnp.uint8)
                for s in range(num_seeds)
            ]
        )

    def host(dd, neup, cd, sus, valid):
        return _deepsight_host(dd, neup, cd, sus, valid, tau=tau, min_cluster_size=min_cluster_size)

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del key, client_ids
        valid, clean, w = prepare(updates, client_weights)
        name = output_layer or find_output_layer(global_variables["params"])
        out = clean["params"][name]
        neup, te = neups_and_te(out["kernel"], out["bias"])
        te = te.astype(jnp.float32)
        med_te = masked_median(te, valid)
        suspicious = te < med_te / 2.0
        dd = ddifs(
            model,
            normalize,
            global_variables,
            clean,
            noise_images(),
            batch_size=bs,
            client_chunk=client_chunk,
        )
        cd = 1.0 - cosine_similarity(out["bias"])
        spec = jax.ShapeDtypeStruct(valid.shape, jnp.float32)
        accepted = jax.pure_callback(
            host, spec, dd, neup, cd, suspicious, valid, vmap_method="sequential"
        )
        norms = row_norms(selected_rows(clean, "params"))
        st = masked_median(norms, valid)
        clipped = scale_params_rows(clean, clip_factors(norms, st))
        update = masked_weighted_mean(clipped, w * accepted)
        score = 1.0 - te / jnp.maximum(med_te, 1e-30)
        accepted, scores = finish(accepted, score, valid)
        return DefenseResult(update, accepted, scores), state

    return Defense(lambda v: EmptyState(), apply)


def _build(
    ctx: DefenseContext,
    num_seeds: int = 3,
    num_samples: int = 20000,
    tau: float = 1.0 / 3.0,
    min_cluster_size: int = 5,
    batch_size: int = 500,
    client_chunk: int | None = None,
    output_layer: str | None = None,
) -> Defense:
    return deepsight(
        ctx.model,
        ctx.normalize,
        ctx.image_shape,
        num_seeds=num_seeds,
        num_samples=num_samples,
        tau=tau,
        min_cluster_size=min_cluster_size,
        batch_size=batch_size,
        client_chunk=client_chunk,
        output_layer=output_layer or output_layer_name(ctx),
    )
