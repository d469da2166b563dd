"""experiments/paper_tables.py: means over seeds and ties, on hand-made runs."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pt():
    spec = importlib.util.spec_from_file_location(
        "paper_tables", ROOT / "experiments" / "paper_tables.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(defense, attack, seed, accepted_rounds, acc=90.0, cad=80.0):
    ids = [3, 1, 2]
    records = [{"client_ids": ids, "accepted": acc_r} for acc_r in accepted_rounds]
    return {
        "status": "done",
        "defense": defense,
        "attack": attack,
        "seed": seed,
        "acc": acc,
        "asr": 10.0,
        "tpr": 100.0,
        "fpr": 0.0,
        "cad": cad,
        "records": records,
    }


def test_ties_need_the_same_accepted_clients_in_every_round_of_every_seed(pt):
    a = [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]  # round 0 accepts {2, 3}, round 1 {1, 2}
    shuffled = [[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]  # round 0 accepts {1, 3}
    rows = [
        _row("mars", "mra", 0, a),
        _row("multikrum", "mra", 0, a, acc=91.0, cad=80.5),
        _row("mars", "mra", 1, a),
        _row("multikrum", "mra", 1, a),
        _row("flame", "mra", 0, a),
        _row("flame", "mra", 1, shuffled),
        _row("fedclp", "mra", 0, a),
        _row("fedclp", "mra", 1, a),
        # FoolsGold's soft weight 0.5 counts as rejected (the TPR/FPR rule)
        _row("foolsgold", "mra", 0, [[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]]),
        _row("foolsgold", "mra", 1, a),
    ]
    got = pt.ties(rows, exclude=("fedclp",))
    # different CADs do not matter; one differing round (flame, seed 1) breaks the tie
    assert ("mra", "mars", "multikrum") in got
    assert not any("flame" in t for t in got)
    assert not any("fedclp" in t for t in got)
    assert ("mra", "foolsgold", "mars") not in got and ("mra", "foolsgold", "multikrum") not in got
    assert pt.decisions(rows)[("foolsgold", "mra", 0)] == ((3,), (1, 2))


def test_seeds_are_averaged_not_overwritten(pt):
    rows = [_row("mars", "3dfed", s, [], acc=90.0 + 2 * s, cad=80.0) for s in range(3)]
    cell = pt._ours(rows)[("mars", "3dfed")]
    assert cell["n"] == 3
    assert cell["mean"][0] == pytest.approx(92.0)
    assert cell["std"][0] == pytest.approx((8 / 3) ** 0.5)  # population std of 90, 92, 94
    assert pt._cell(cell).startswith("92.00±1.63 / 10.00±0.00")
