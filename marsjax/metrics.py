"""Metrics of the paper (Appendix F), all in percent.

* ACC: clean test accuracy.
* ASR: share of ALL test images that, with the trigger stamped, are classified as the target
  label; the target class is not excluded, so a clean model scores about ``100 / num_classes``.
  ``asr_excl_target`` is the variant that leaves the target class's own images out.
* TPR: backdoor models flagged / backdoor models, FPR: benign models flagged / benign models, per
  round; a client is flagged when its ``accepted`` weight is ``<= 0.5``. The paper averages the
  per-round rates over the attack rounds (mars_spec §2.1, §6.11). An upload the round drops
  before the defense (non-finite, or its squared norm overflows float32) has ``accepted = 0``
  and so counts as rejected: it never reaches the aggregate. ``tpr_excl_dropped`` /
  ``fpr_excl_dropped`` are the same rates over the uploads the defense judged, for telling a
  defense's decisions apart from the round's safety net; the tables show ``tpr`` / ``fpr``.
* CAD, one rule everywhere (``marsjax run``, summaries, sweep tables; :data:`CAD_RULE`): the
  mean of ACC, 100 - ASR, TPR and 100 - FPR over the terms that are defined. TPR is undefined
  when no attacker took part (``attack=none``) and TPR/FPR are undefined for a defense without
  detection decisions (FedCLP, :data:`marsjax.defenses.NO_DETECTION`); those show as "–" and
  are left out: (ACC + 100 - ASR + 100 - FPR) / 3 without attackers, (ACC + 100 - ASR) / 2
  without detection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CAD_RULE", "cad", "detection_rates", "make_evaluate", "summarize"]

CAD_RULE = (
    "CAD = mean of ACC, 100-ASR, TPR, 100-FPR over the defined terms (a '–' term is left out: "
    "TPR without attackers, TPR/FPR of a defense without detection decisions such as FedCLP)"
)


def detection_rates(accepted: jax.Array, is_attacking: jax.Array, counted: jax.Array | None = None):
    """Per-round TPR and FPR in percent (NaN when the round has no attacker / no benign client).

    ``counted`` (a boolean row mask, default all rows) restricts both rates to those rows: the
    round passes its finite uploads to get the rates over what the defense actually judged
    (``tpr_excl_dropped``; in ``tpr`` a dropped upload counts as rejected).
    """
    flagged = accepted <= 0.5
    mal = is_attacking
    ben = ~is_attacking
    if counted is not None:
        mal = mal & counted
        ben = ben & counted
    n_mal = jnp.sum(mal)
    n_ben = jnp.sum(ben)
    tpr = jnp.where(n_mal > 0, 100.0 * jnp.sum(flagged & mal) / jnp.maximum(n_mal, 1), jnp.nan)
    fpr = jnp.where(n_ben > 0, 100.0 * jnp.sum(flagged & ben) / jnp.maximum(n_ben, 1), jnp.nan)
    return tpr.astype(jnp.float32), fpr.astype(jnp.float32)


def _defined(v) -> bool:
    return v is not None and bool(np.isfinite(v))


def cad(acc, asr, tpr=None, fpr=None):
    """Comprehensive attack-defense score (%), the paper's CAD: the mean of ACC, 100 - ASR, TPR
    and 100 - FPR over the terms that are defined (``None`` or NaN terms are left out;
    :data:`CAD_RULE`). NaN when ACC or ASR is undefined."""
    if not (_defined(acc) and _defined(asr)):
        return float("nan")
    terms = [acc, 100.0 - asr]
    if _defined(tpr):
        terms.append(tpr)
    if _defined(fpr):
        terms.append(100.0 - fpr)
    return float(sum(terms)) / len(terms)


def make_evaluate(
    model: nn.Module,
    normalize: Callable[[jax.Array], jax.Array],
    trigger_fn: Callable[[jax.Array, object], jax.Array],
    target_label: int,
    batch_size: int = 1000,
    asr_images: np.ndarray | None = None,
):
    """Builds a jitted ``evaluate(variables, attack_state, x_test, y_test) -> dict`` (percent).

    The test set is processed in ``batch_size`` chunks (``lax.map``); the last chunk is padded and
    masked. Returned keys: ``acc``, ``asr``, ``asr_excl_target``, ``loss``.

    ``asr_images`` (``[M, H, W, C]`` uint8, an attack's own backdoor set, e.g. the held-out part
    of a semantic backdoor's subset; none of its images may belong to the target class): when
    given, ``asr`` and ``asr_excl_target`` are both the share of these images, passed through
    ``trigger_fn``, classified as the target, instead of the triggered test set's.
    """

    def logits_of(variables, x):
        return model.apply(variables, normalize(x), train=False)

    def chunked(x, b):
        """``[chunks, b, ...]`` padded chunks of ``x`` and their ``[chunks, b]`` validity mask."""
        n = x.shape[0]
        chunks = -(-n // b)
        pad = chunks * b - n
        xs = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
        valid = jnp.arange(chunks * b) < n
        return xs.reshape(chunks, b, *x.shape[1:]), valid.reshape(chunks, b)

    def own_asr(variables, attack_state):
        x = jnp.asarray(asr_images)
        xs, valid = chunked(x, min(batch_size, x.shape[0]))

        def one(args):
            xb, v = args
            pred = jnp.argmax(logits_of(variables, trigger_fn(xb, attack_state)), -1)
            return jnp.sum((pred == target_label) & v)

        return 100.0 * jnp.sum(jax.lax.map(one, (xs, valid))) / x.shape[0]

    @jax.jit
    def evaluate(variables, attack_state, x_test, y_test):
        n = x_test.shape[0]
        b = min(batch_size, n)
        chunks = -(-n // b)
        pad = chunks * b - n
        xs = jnp.concatenate([x_test, jnp.zeros((pad, *x_test.shape[1:]), x_test.dtype)])
        ys = jnp.concatenate([y_test, jnp.zeros((pad,), y_test.dtype)])
        valid = jnp.arange(chunks * b) < n
        xs = xs.reshape(chunks, b, *x_test.shape[1:])
        ys = ys.reshape(chunks, b)
        valid = valid.reshape(chunks, b)

        def one(args):
            x, y, v = args
            logits = logits_of(variables, x)
            pred = jnp.argmax(logits, -1)
            logp = jax.nn.log_softmax(logits)
            loss = -jnp.take_along_axis(logp, y[:, None], -1)[:, 0]
            bd_pred = jnp.argmax(logits_of(variables, trigger_fn(x, attack_state)), -1)
            hit = bd_pred == target_label
            not_target = y != target_label
            return (
                jnp.sum((pred == y) & v),
                jnp.sum(hit & v),
                jnp.sum(hit & v & not_target),
                jnp.sum(v & not_target),
                jnp.sum(jnp.where(v, loss, 0.0)),
            )

        correct, hits, hits_nt, n_nt, loss = jax.tree.map(
            jnp.sum, jax.lax.map(one, (xs, ys, valid))
        )
        out = {
            "acc": 100.0 * correct / n,
            "asr": 100.0 * hits / n,
            "asr_excl_target": 100.0 * hits_nt / jnp.maximum(n_nt, 1),
            "loss": loss / n,
        }
        if asr_images is not None:
            out["asr"] = out["asr_excl_target"] = own_asr(variables, attack_state)
        return out

    return evaluate


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def summarize(records: Sequence[dict], attack_active: bool = True, detects: bool = True) -> dict:
    """Paper-style summary of per-round records (``metrics.jsonl`` lines).

    ACC/ASR are the last evaluated round's; TPR/FPR are the means of the per-round rates over the
    rounds in which the attack was active (all rounds if there is no attack), NaN for a defense
    without detection decisions (``detects=False``); CAD from those (:func:`cad`).
    ``tpr_excl_dropped`` / ``fpr_excl_dropped`` average the per-round rates that leave dropped
    uploads out (module docstring).
    """
    evaluated = [r for r in records if r.get("acc") is not None]
    last = evaluated[-1] if evaluated else {}
    rounds = [r for r in records if r.get("attack_active")] if attack_active else list(records)
    if not rounds:
        rounds = list(records)

    def rate(key):
        return _nanmean([r.get(key) for r in rounds]) if detects else float("nan")

    tpr, fpr = rate("tpr"), rate("fpr")
    acc = last.get("acc", float("nan"))
    asr = last.get("asr", float("nan"))
    out = {
        "round": last.get("round"),
        "acc": acc,
        "asr": asr,
        "asr_excl_target": last.get("asr_excl_target", float("nan")),
        "tpr": tpr,
        "fpr": fpr,
    }
    out["cad"] = cad(acc, asr, tpr, fpr)
    # The same rates over the uploads the defense judged (dropped ones left out); NaN for
    # records written before the round reported them.
    out["tpr_excl_dropped"] = rate("tpr_excl_dropped")
    out["fpr_excl_dropped"] = rate("fpr_excl_dropped")
    out["dropped"] = int(sum(r.get("num_dropped", 0) for r in records))
    out["reverted"] = int(sum(r.get("reverted", 0) for r in records))
    return out
