"""experiments/compare_first_rounds.py: two runs' global models after their first rounds."""

import importlib.util
import json
import pathlib

from marsjax.config import get_preset, override, to_dict

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location(
        "compare_first_rounds", ROOT / "experiments/compare_first_rounds.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_folder(path: pathlib.Path, defense: str) -> pathlib.Path:
    cfg = override(
        get_preset("demo", defense=defense),
        {"run.rounds": 1, "run.clients_per_round": 6, "train.local_steps": 2},
    )
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**to_dict(cfg), "commit": "abc"}))
    return path


def test_tied_rows_and_global_differences_are_reported(tmp_path):
    mod = _module()
    fedavg = _run_folder(tmp_path / "fedavg", "fedavg")
    krum = _run_folder(tmp_path / "krum", "krum")  # keeps one of the six uploads
    rec = mod.compare(fedavg, krum, rounds=1)
    other = rec["rounds"][0]
    assert rec["runs_commits"] == ["abc", "abc"]
    assert not other["same_accepted"] and not other["bitwise_equal"]
    assert other["max_abs_diff"] == max(other["max_abs_diff_per_leaf"]) > 0
    assert len(other["max_abs_diff_per_leaf"]) == len(other["max_abs_value_per_leaf"])
    assert other["train_loss"][0] == other["train_loss"][1]  # same start, same local training
