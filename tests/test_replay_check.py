"""experiments/replay_check.py: a committed run's first rounds replayed with the current code.

A real (tiny, MARS on ``digits``) run is written to disk and replayed: every round must come back
identical. Then its committed ``metrics.jsonl`` is altered by hand (a different accepted set in
round 1, a loss and a score moved by known amounts in round 2) and each change must be reported,
in its round, with the right size.
"""

import json

import pytest

from marsjax import simulation
from marsjax.config import get_preset, override
from marsjax.data import load_dataset


@pytest.fixture(scope="module")
def committed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay") / "run"
    cfg = override(
        get_preset("demo", defense="mars"),
        {"run.rounds": 3, "run.eval_every": 3, "run.out_dir": str(out)},
    )
    simulation.run(cfg, dataset=load_dataset("digits"), progress=False)
    return out


def test_an_unchanged_run_replays_identically(committed_run, experiment_script):
    mod = experiment_script("replay_check")
    rec = mod.replay(committed_run, rounds=3)
    assert rec["all_identical"] and rec["rounds_replayed"] == 3
    assert rec["first_round_not_identical"] is None
    assert rec["first_round_other_decisions"] is None
    assert [r["round"] for r in rec["rounds"]] == [0, 1, 2]
    for r in rec["rounds"]:
        assert r["same_decisions"] and r["differing_fields"] == []
        assert r["train_loss_abs_diff"] == 0.0 and r["scores_max_abs_diff"] == 0.0
        assert r["fields_only_replayed"] == []
        assert "accepted" not in r["differing_fields"]


def test_changed_records_are_reported_in_their_round(committed_run, tmp_path, experiment_script):
    mod = experiment_script("replay_check")
    run = tmp_path / "altered"
    run.mkdir()
    (run / "config.json").write_text((committed_run / "config.json").read_text())
    rows = [json.loads(x) for x in (committed_run / "metrics.jsonl").read_text().splitlines()]
    rows[1]["accepted"][0] = 1.0 - rows[1]["accepted"][0]
    loss2 = rows[2]["train_loss"]
    rows[2]["train_loss"] = loss2 + 0.125
    score = rows[2]["scores"][3]
    rows[2]["scores"][3] = score * 1.5 if score else 2.0
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    rec = mod.replay(run, rounds=3)
    r0, r1, r2 = rec["rounds"]
    assert r0["identical"] and r0["same_decisions"]
    assert not r1["same_decisions"] and r1["differing_fields"] == ["accepted"]
    assert r2["same_decisions"] and not r2["identical"]
    assert r2["differing_fields"] == ["scores", "train_loss"]
    assert r2["train_loss_abs_diff"] == pytest.approx(0.125, abs=1e-12)
    want = abs(score * 0.5) if score else 2.0
    assert r2["scores_max_abs_diff"] == pytest.approx(want, rel=1e-12)
    assert rec["first_round_not_identical"] == 1 and rec["first_round_other_decisions"] == 1
    assert not rec["all_identical"]
    with pytest.raises(SystemExit, match="only 3 committed rounds"):
        mod.replay(run, rounds=4)


def test_number_differences_by_hand(experiment_script):
    mod = experiment_script("replay_check")
    assert mod._max_diff([1.0, 2.0, float("nan")], [1.5, 2.0, float("nan")]) == (0.5, 0.5)
    assert mod._max_diff([4.0, 1.0], [3.0, float("nan")]) == (float("inf"), float("inf"))
    assert mod._max_diff([4.0, -2.0], [3.0, -2.5]) == (1.0, 0.25)
    assert mod._max_diff(None, [1.0]) == (None, None)
    assert mod._max_diff([1.0], [1.0, 2.0]) == (None, None)
    assert mod._max_diff([], []) == (0.0, 0.0)
