"""FLDetector: consistency of client updates with an L-BFGS prediction of them.

Zhang, Fang, Gong & Zhang, "FLDetector: Defending Federated Learning Against Model Poisoning
Attacks via Detecting Malicious Clients", KDD 2022, arXiv:2207.09209. MARS baseline settings
(mars_spec §2.4): a window of ``N = 10`` rounds, the gap statistic, k-means with 2 clusters.

The server keeps the last ``N`` pairs ``s_r = w_r - w_{r-1}`` (global model change) and
``y_r = gbar_r - gbar_{r-1}`` (change of the aggregated update). With them the compact L-BFGS form
(Byrd, Nocedal & Schnabel 1994) gives a Hessian-vector product ``H v``. Client ``i``'s update is
predicted as ``g_i(t_i) + H (w_t - w_{t_i})`` from its previous update at round ``t_i``; the
suspicion score is the distance ``||pred_i - g_i||``, normalised by its sum over the round's
clients and averaged over the client's last ``N`` observations. If the gap statistic finds more
than one cluster among the scores, 2-means splits them and the cluster with the larger mean score
is malicious.

Adaptations to a sampled federation (the paper lets every client take part every round):

* the prediction uses ``w_t - w_{t_i}`` (the sum of the stored ``s_r`` since the client's last
  round, available when ``t - t_i <= N + 1``), and the score averages the client's own last ``N``
  observations (``min_observations`` of them needed);
* predictions start once the window is full (``N`` pairs), as in the 3DFed code;
* flagged clients are rejected in that round and, with ``exclude_detected`` (default, like the
  paper), in every later round; the paper's restart of training is not reproduced.

Updates are the paper's "gradients" (the 3DFed code uses the local models' weights instead).
The defense needs client identities across rounds: ``apply`` takes ``client_ids`` (``int32 [N]``,
the simulator passes the round's sampled ids) and keys every per-client array by id; it refuses
to run without them (the round's rows are shuffled, so a row index is not a client). The state keeps ``[num_clients, D]`` previous updates: ``layers``
restricts ``D`` (``"params"`` by default; ``"output"`` for very large models).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from marsjax.defenses._robust_utils import (
    Layers,
    finish,
    flat_rows,
    gap_statistic,
    kmeans,
    masked_weighted_mean,
    prepare,
)
from marsjax.defenses.base import Defense, DefenseContext, DefenseResult

__all__ = ["FLDetectorState", "fldetector", "lbfgs_hvp"]

_HI = jax.lax.Precision.HIGHEST


class FLDetectorState(NamedTuple):
    """FLDetector's memory (all arrays, checkpointable).

    Attributes:
      round: rounds seen.
      prev_w: ``[D]`` previous global model (selected leaves).
      prev_gbar: ``[D]`` previous aggregated update.
      s, y: ``[window, D]`` ring buffers of the pairs; ``pair_round [window]`` their rounds (-1:
        empty).
      last_update: ``[num_clients, D]`` each client's latest update; ``last_round [num_clients]``
        its round (-1: never seen).
      dist: ``[num_clients, window]`` ring of normalised distances; ``dist_count [num_clients]``.
      excluded: ``bool [num_clients]`` clients detected earlier.
    """

    round: jax.Array
    prev_w: jax.Array
    prev_gbar: jax.Array
    s: jax.Array
    y: jax.Array
    pair_round: jax.Array
    last_update: jax.Array
    last_round: jax.Array
    dist: jax.Array
    dist_count: jax.Array
    excluded: jax.Array


def lbfgs_factors(s: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sigma, M)`` of the compact L-BFGS form for pairs ``s, y [m, D]`` (see :func:`lbfgs_hvp`)."""
    m = s.shape[0]
    sy = jnp.dot(s, y.T, precision=_HI)  # [m, m] (S^T Y)
    ss = jnp.dot(s, s.T, precision=_HI)
    low = jnp.tril(sy, -1)
    d = jnp.diag(jnp.diag(sy))
    sigma = sy[m - 1, m - 1] / ss[m - 1, m - 1]
    return sigma, jnp.block([[sigma * ss, low], [low.T, -d]])


def lbfgs_hvp(s: jax.Array, y: jax.Array, v: jax.Array, factors=None) -> jax.Array:
    """Compact L-BFGS approximation ``B v`` of the Hessian from pairs ``(s_k, y_k)``.

    ``B = sigma I - [sigma S, Y] M^{-1} [sigma S^T; Y^T]`` with ``M = [[sigma S^T S, L],
    [L^T, -D]]``, ``L`` the strictly lower part and ``D`` the diagonal of ``S^T Y``, and
    ``sigma = y_m^T s_m / s_m^T s_m`` (Byrd, Nocedal & Schnabel 1994, Thm. 2.3).

    Args:
      s, y: ``[m, D]`` pairs, oldest first.
      v: ``[n, D]`` vectors.
      factors: :func:`lbfgs_factors` of ``(s, y)``, when already computed.

    Returns:
      ``[n, D]`` products ``B v_i``.
    """
    m = s.shape[0]
    sigma, mat = lbfgs_factors(s, y) if factors is None else factors
    p = jnp.concatenate(
        [sigma * jnp.dot(s, v.T, precision=_HI), jnp.dot(y, v.T, precision=_HI)], axis=0
    )
    q = jnp.linalg.solve(mat, p)  # [2m, n]
    corr = sigma * jnp.dot(q[:m].T, s, precision=_HI) + jnp.dot(q[m:].T, y, precision=_HI)
    return sigma * v - corr


def fldetector(
    num_clients: int,
    *,
    window: int = 10,
    layers: Layers = "params",
    num_refs: int = 20,
    k_max: int = 10,
    min_observations: int = 1,
    exclude_detected: bool = True,
    output_layer: str | None = None,
) -> Defense:
    """FLDetector.

    Args:
      num_clients: size of the federation.
      window: ``N``, the number of stored pairs and of distances averaged per client.
      layers: the leaves the model, the updates and the predictions use.
      num_refs: reference sets of the gap statistic (3DFed: 20).
      k_max: largest number of clusters the gap statistic tries.
      min_observations: distances a client needs before it is scored.
      exclude_detected: keep rejecting a detected client in later rounds.
      output_layer: the output layer's name for ``layers="output"``.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")

    def flat_tree(tree):
        return flat_rows(jax.tree.map(lambda x: x[None], tree), layers, output_layer)[0]

    def init(global_variables):
        d = flat_tree(global_variables).shape[0]
        z = jnp.zeros
        return FLDetectorState(
            round=jnp.int32(0),
            prev_w=z((d,), jnp.float32),
            prev_gbar=z((d,), jnp.float32),
            s=z((window, d), jnp.float32),
            y=z((window, d), jnp.float32),
            pair_round=jnp.full((window,), -1, jnp.int32),
            last_update=z((num_clients, d), jnp.float32),
            last_round=jnp.full((num_clients,), -1, jnp.int32),
            dist=z((num_clients, window), jnp.float32),
            dist_count=jnp.zeros((num_clients,), jnp.int32),
            excluded=jnp.zeros((num_clients,), bool),
        )

    def apply(
        key, updates, state: FLDetectorState, *, global_variables, client_weights, client_ids
    ):
        if client_ids is None:
            raise ValueError(
                "fldetector keeps per-client state: apply(..., client_ids=int32 [N]) is "
                "required (the round's rows are shuffled, a row index is not a client)"
            )
        valid, clean, w = prepare(updates, client_weights)
        n = w.shape[0]
        ids = jnp.asarray(client_ids, jnp.int32)
        t = state.round
        g = flat_rows(clean, layers, output_layer)  # [n, D]
        w_t = flat_tree(global_variables).astype(jnp.float32)
        v_now = w_t - state.prev_w

        # --- predictions: pred_i = g_i(t_i) + B (w_t - w_{t_i})
        order = jnp.argsort(state.pair_round)  # oldest first (empty slots, -1, come first)
        s_ord, y_ord, r_ord = state.s[order], state.y[order], state.pair_round[order]
        full = jnp.all(state.pair_round >= 0)
        t_i = state.last_round[ids]
        seen = (t_i >= 0) & (t - t_i <= window + 1) & (t >= 1)
        coef = ((r_ord[None, :] > t_i[:, None]) & (r_ord[None, :] <= t - 1)).astype(jnp.float32)
        factors = lbfgs_factors(s_ord, y_ord)

        def distance(args):  # one client at a time: O(D) memory, not O(N D)
            c, gi, idx = args
            v = v_now + jnp.dot(c, s_ord, precision=_HI)
            pred = state.last_update[idx] + lbfgs_hvp(s_ord, y_ord, v[None], factors)[0]
            return jnp.sqrt(jnp.sum(jnp.square(pred - gi)))

        dist = jax.lax.map(distance, (coef, g, ids))
        has_pred = valid & seen & full & jnp.isfinite(dist)
        tot = jnp.sum(jnp.where(has_pred, dist, 0.0))
        nd = jnp.where(has_pred & (tot > 0), dist / jnp.where(tot > 0, tot, 1.0), 0.0)

        # --- per-client ring of normalised distances
        cnt = state.dist_count[ids]
        slot = cnt % window
        old_row = state.dist[ids]
        new_row = jnp.where(
            has_pred[:, None] & (jnp.arange(window)[None, :] == slot[:, None]), nd[:, None], old_row
        )
        dist_buf = state.dist.at[ids].set(new_row)
        cnt = cnt + has_pred.astype(jnp.int32)
        dist_count = state.dist_count.at[ids].set(cnt)
        nobs = jnp.minimum(cnt, window)
        score = jnp.sum(
            new_row * (jnp.arange(window)[None, :] < nobs[:, None]), axis=1
        ) / jnp.maximum(nobs, 1)

        # --- detection: gap statistic, then 2-means on the scores
        excluded = state.excluded[ids]
        cand = valid & (nobs >= min_observations) & ~excluded
        k_gap, k_km = jax.random.split(key)
        x = score[:, None]
        k, _, _ = gap_statistic(k_gap, x, cand, k_max=min(k_max, n), num_refs=num_refs)
        lab, _, _ = kmeans(k_km, x, cand.astype(jnp.float32), 2)
        m0 = jnp.sum(jnp.where(cand & (lab == 0), score, 0.0)) / jnp.maximum(
            jnp.sum(cand & (lab == 0)), 1
        )
        m1 = jnp.sum(jnp.where(cand & (lab == 1), score, 0.0)) / jnp.maximum(
            jnp.sum(cand & (lab == 1)), 1
        )
        bad_label = jnp.where(m1 > m0, 1, 0)
        detect = (k >= 2) & (jnp.sum(cand) >= 2)
        flagged = detect & cand & (lab == bad_label)
        accepted = valid & ~flagged & ~excluded
        new_excl = state.excluded
        if exclude_detected:
            new_excl = new_excl.at[ids].set(excluded | flagged)

        update = masked_weighted_mean(clean, w * accepted)

        # --- memory for the next round
        wa = w * accepted
        gbar = jnp.dot(wa, g, precision=_HI) / jnp.maximum(jnp.sum(wa), 1e-30)
        push = (t >= 1) & jnp.any(accepted)
        oldest = jnp.argmin(jnp.where(state.pair_round < 0, -(2**30), state.pair_round))
        s_buf = jnp.where(push, state.s.at[oldest].set(v_now), state.s)
        y_buf = jnp.where(push, state.y.at[oldest].set(gbar - state.prev_gbar), state.y)
        pr = jnp.where(push, state.pair_round.at[oldest].set(t), state.pair_round)
        keep = valid[:, None]
        last_update = state.last_update.at[ids].set(jnp.where(keep, g, state.last_update[ids]))
        last_round = state.last_round.at[ids].set(jnp.where(valid, t, state.last_round[ids]))
        new_state = FLDetectorState(
            round=t + 1,
            prev_w=w_t,
            prev_gbar=jnp.where(jnp.any(accepted), gbar, state.prev_gbar),
            s=s_buf,
            y=y_buf,
            pair_round=pr,
            last_update=last_update,
            last_round=last_round,
            dist=dist_buf,
            dist_count=dist_count,
            excluded=new_excl,
        )
        accepted, scores = finish(accepted.astype(jnp.float32), score, valid)
        return DefenseResult(update, accepted, scores), new_state

    return Defense(init, apply)


def _build(
    ctx: DefenseContext,
    window: int = 10,
    layers: Layers = "params",
    num_refs: int = 20,
    k_max: int = 10,
    min_observations: int = 1,
    exclude_detected: bool = True,
    output_layer: str | None = None,
) -> Defense:
    return fldetector(
        ctx.num_clients,
        window=window,
        layers=layers,
        num_refs=num_refs,
        k_max=k_max,
        min_observations=min_observations,
        exclude_detected=exclude_detected,
        output_layer=output_layer,
    )
