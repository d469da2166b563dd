"""The metrics behind every table (marsjax.metrics), on hand-worked cases (all in percent)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marsjax.metrics import cad, detection_rates, make_evaluate, summarize

NAN = float("nan")


# ------------------------------------------------------------------------------------------------
# CAD = mean of ACC, 100 - ASR, TPR, 100 - FPR over the defined terms


def test_cad_with_every_term():
    # (90 + (100 - 10) + 80 + (100 - 20)) / 4 = 340 / 4
    assert cad(90.0, 10.0, 80.0, 20.0) == 85.0
    assert cad(100.0, 0.0, 100.0, 0.0) == 100.0
    assert cad(0.0, 100.0, 0.0, 100.0) == 0.0


def test_cad_leaves_undefined_terms_out():
    # no detection decisions: (ACC + 100 - ASR) / 2
    assert cad(90.0, 10.0) == 90.0
    assert cad(90.0, 10.0, NAN, NAN) == 90.0
    # no attacker took part (TPR undefined): (90 + 90 + (100 - 20)) / 3
    assert cad(90.0, 10.0, None, 20.0) == pytest.approx(260.0 / 3)
    assert cad(90.0, 10.0, NAN, 20.0) == pytest.approx(260.0 / 3)
    # no benign client took part (FPR undefined): (90 + 90 + 80) / 3
    assert cad(90.0, 10.0, 80.0, NAN) == pytest.approx(260.0 / 3)
    assert math.isnan(cad(NAN, 10.0, 80.0, 20.0))


# ------------------------------------------------------------------------------------------------
# TPR / FPR: a client is flagged when accepted <= 0.5


def test_detection_rates_worked_example():
    accepted = jnp.array([1.0, 0.5, 0.2, 1.0, 0.6, 0.0, 0.51, 0.9])
    attacking = jnp.array([True, True, True, False, False, False, False, False])
    # flagged: rows 1 (0.5 is flagged), 2 and 5; attackers 0-2: 2 of 3 flagged; benign 3-7: 1 of 5
    tpr, fpr = detection_rates(accepted, attacking)
    assert tpr.dtype == jnp.float32 and fpr.dtype == jnp.float32
    np.testing.assert_allclose(float(tpr), 200.0 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(fpr), 20.0, rtol=1e-6)


def test_detection_rates_without_attackers_or_without_benign_clients():
    accepted = jnp.array([0.0, 1.0, 1.0, 0.3])
    tpr, fpr = detection_rates(accepted, jnp.zeros(4, bool))
    assert math.isnan(float(tpr))  # no attacker: TPR undefined
    assert float(fpr) == 50.0  # rows 0 and 3 of 4 benign flagged
    tpr, fpr = detection_rates(accepted, jnp.ones(4, bool))
    assert float(tpr) == 50.0 and math.isnan(float(fpr))
    # under jit too (the round computes them inside the compiled step)
    tpr, fpr = jax.jit(detection_rates)(accepted, jnp.array([True, False, False, True]))
    assert float(tpr) == 100.0 and float(fpr) == 0.0


def test_detection_rates_over_the_counted_rows_only():
    # rows 0-2 attack, 3-5 benign; rows 0 and 3 were dropped before the defense (accepted 0)
    accepted = jnp.array([0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    attacking = jnp.array([True, True, True, False, False, False])
    counted = jnp.array([False, True, True, False, True, True])
    tpr, fpr = detection_rates(accepted, attacking)
    np.testing.assert_allclose([float(tpr), float(fpr)], [200.0 / 3, 100.0 / 3], rtol=1e-6)
    # judged rows only: attackers 1, 2 -> 1 of 2 flagged; benign 4, 5 -> none flagged
    tpr, fpr = jax.jit(detection_rates)(accepted, attacking, counted)
    assert float(tpr) == 50.0 and float(fpr) == 0.0
    # every attacker dropped: TPR over judged rows undefined
    tpr, _ = detection_rates(accepted, attacking, jnp.array([False] * 3 + [True] * 3))
    assert math.isnan(float(tpr))


# ------------------------------------------------------------------------------------------------
# summarize: ACC/ASR of the last evaluated round; TPR/FPR averaged over the attack rounds

RECORDS = [
    {"round": 0, "attack_active": False, "tpr": NAN, "fpr": 50.0, "num_dropped": 1, "reverted": 0},
    {
        "round": 1,
        "attack_active": True,
        "tpr": 100.0,
        "fpr": 0.0,
        "acc": 80.0,
        "asr": 30.0,
        "asr_excl_target": 25.0,
        "num_dropped": 0,
        "reverted": 1,
    },
    {"round": 2, "attack_active": True, "tpr": 50.0, "fpr": 25.0, "num_dropped": 2},
    {
        "round": 3,
        "attack_active": True,
        "tpr": None,  # no attacker sampled in this round
        "fpr": 10.0,
        "acc": 90.0,
        "asr": 20.0,
        "asr_excl_target": 12.5,
    },
]


def test_summarize_worked_example():
    s = summarize(RECORDS)
    assert s["round"] == 3 and s["acc"] == 90.0 and s["asr"] == 20.0
    assert s["asr_excl_target"] == 12.5
    # attack rounds 1-3: TPR mean(100, 50) = 75 (round 3 has none), FPR mean(0, 25, 10) = 35/3
    assert s["tpr"] == pytest.approx(75.0)
    assert s["fpr"] == pytest.approx(35.0 / 3)
    # CAD = (90 + 80 + 75 + (100 - 35/3)) / 4
    assert s["cad"] == pytest.approx((90 + 80 + 75 + 100 - 35.0 / 3) / 4)
    assert s["dropped"] == 3 and s["reverted"] == 1
    # records without the judged-rows rates (written before the round reported them): NaN
    assert math.isnan(s["tpr_excl_dropped"]) and math.isnan(s["fpr_excl_dropped"])
    judged = [
        dict(r, tpr_excl_dropped=t, fpr_excl_dropped=f)
        for r, t, f in zip(RECORDS, [NAN, 100.0, 0.0, None], [40.0, 0.0, 20.0, 10.0])
    ]
    s = summarize(judged)
    # attack rounds 1-3: TPR mean(100, 0) = 50, FPR mean(0, 20, 10) = 10; tpr/fpr unchanged
    assert s["tpr_excl_dropped"] == pytest.approx(50.0)
    assert s["fpr_excl_dropped"] == pytest.approx(10.0)
    assert s["tpr"] == pytest.approx(75.0)
    assert math.isnan(summarize(judged, detects=False)["tpr_excl_dropped"])


def test_summarize_over_all_rounds_without_an_attack():
    s = summarize(RECORDS, attack_active=False)
    # every round: TPR mean(100, 50) = 75, FPR mean(50, 0, 25, 10) = 21.25
    assert s["tpr"] == pytest.approx(75.0) and s["fpr"] == pytest.approx(21.25)
    assert s["cad"] == pytest.approx((90 + 80 + 75 + 78.75) / 4)


def test_summarize_when_no_attacker_was_ever_sampled():
    records = [dict(r, tpr=NAN) for r in RECORDS]
    s = summarize(records)
    assert math.isnan(s["tpr"]) and s["fpr"] == pytest.approx(35.0 / 3)
    # CAD over the defined terms: (90 + 80 + (100 - 35/3)) / 3
    assert s["cad"] == pytest.approx((90 + 80 + 100 - 35.0 / 3) / 3)
    # no round flagged active: TPR/FPR over all rounds
    s = summarize([dict(r, attack_active=False) for r in RECORDS])
    assert s["fpr"] == pytest.approx(21.25)


def test_summarize_for_a_defense_without_detection_decisions():
    s = summarize(RECORDS, detects=False)
    assert math.isnan(s["tpr"]) and math.isnan(s["fpr"])
    assert s["cad"] == pytest.approx((90 + 80) / 2)


# ------------------------------------------------------------------------------------------------
# make_evaluate: ACC, ASR over all triggered images, ASR without the target class, loss


class PixelClassifier(nn.Module):
    """Predicts the class stored in pixel (0, 0) of the image: logits = one_hot(pixel)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return jax.nn.one_hot(x[:, 0, 0, 0].astype(jnp.int32), 10)


def _trigger(x, state):
    # the triggered image's pixel (0, 0) becomes (pixel (0, 1) * state) % 10; a zero image (the
    # padding of the last chunk) then hits the target class 0: padding must be masked out
    return x.at[:, 0, 0, 0].set(((x[:, 0, 1, 0] * state) % 10).astype(x.dtype))


TARGET = 0
Y = np.array([0, 0, 1, 2, 3, 4, 5], np.int32)
CLEAN_PRED = [0, 2, 1, 2, 0, 4, 9]  # correct: images 0, 2, 3, 5 -> ACC = 4/7
TRIGGERED_PRED = [0, 0, 0, 1, 0, 3, 0]  # target 0 hit by images 0, 1, 2, 4, 6 -> ASR = 5/7
# images of another class than the target: 2-6, hit by 2, 4, 6 -> asr_excl_target = 3/5


STATE, INVERSE = 3, 7  # 3 * 7 = 21 = 1 (mod 10)


def _images() -> np.ndarray:
    x = np.full((len(Y), 4, 4, 1), 7, np.uint8)
    x[:, 0, 0, 0] = CLEAN_PRED
    x[:, 0, 1, 0] = (np.array(TRIGGERED_PRED) * INVERSE) % 10
    return x


@pytest.mark.parametrize("batch_size", [3, 1000])  # 3: two padded rows in the last chunk
def test_make_evaluate_worked_example(batch_size):
    evaluate = make_evaluate(
        PixelClassifier(), lambda x: x.astype(jnp.float32), _trigger, TARGET, batch_size
    )
    out = evaluate({}, jnp.int32(STATE), jnp.asarray(_images()), jnp.asarray(Y))
    np.testing.assert_allclose(float(out["acc"]), 400.0 / 7, rtol=1e-6)
    np.testing.assert_allclose(float(out["asr"]), 500.0 / 7, rtol=1e-6)
    np.testing.assert_allclose(float(out["asr_excl_target"]), 60.0, rtol=1e-6)
    # cross entropy of one-hot logits: log(e + 9) - 1 on a correct image, log(e + 9) otherwise
    np.testing.assert_allclose(float(out["loss"]), math.log(math.e + 9) - 4 / 7, rtol=1e-6)
