"""experiments/cerp_pieces.py counts rejected CerP uploads per trigger piece (client id mod 4)."""

import json


def test_per_piece_counts_hand_worked(tmp_path, capsys, experiment_script):
    rounds = [
        # ids 4 and 9 attack (pieces 0 and 1): 4 rejected, 9 accepted; 2 is benign and rejected
        {"client_ids": [4, 9, 2], "is_attacking": [True, True, False], "accepted": [0.0, 1.0, 0.0]},
        # ids 7 and 11 attack (both piece 3): both rejected
        {
            "client_ids": [7, 11, 1],
            "is_attacking": [True, True, False],
            "accepted": [0.0, 0.0, 1.0],
        },
        {"round": 2, "acc": 50.0},  # an evaluation-only record is skipped
    ]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (run / "summary.json").write_text(json.dumps({"tpr": 75.0}))
    mod = experiment_script("cerp_pieces")
    assert mod.per_piece(run / "metrics.jsonl") == [(1, 1), (0, 1), (0, 0), (2, 2)]
    assert mod.main([str(run)]) == 0
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == "| run | 75.0 | 1/1 (100 %) | 0/1 (0 %) | - | 2/2 (100 %) |"
