"""experiments/compare_first_rounds.py: two runs' global models after their first rounds.

The simulator is replaced by a stand-in whose rounds are known (building two real federations
would only re-test the simulator, which its own tests cover), so every reported field is checked
against hand-made global models.
"""

import json
import pathlib
from types import SimpleNamespace

import numpy as np

from marsjax.config import get_preset, to_dict


def _run_folder(path: pathlib.Path, defense: str, commit: str) -> pathlib.Path:
    path.mkdir()
    cfg = to_dict(get_preset("demo", defense=defense))
    (path / "config.json").write_text(json.dumps({**cfg, "commit": commit}))
    return path


class _Sim:
    """Round r adds ``steps[r]`` to every leaf; ``accepted`` and the loss are given per round."""

    def __init__(self, steps, accepted, losses):
        self.steps, self.accepted, self.losses, self.data = steps, accepted, losses, None

    def init_state(self):
        g = {"params": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}}
        return SimpleNamespace(global_variables=g, round=0)

    def round_step(self, state, data):
        r = state.round
        g = {
            k: {n: v + self.steps[r][n] for n, v in p.items()}
            for k, p in state.global_variables.items()
        }
        m = {"accepted": np.asarray(self.accepted[r]), "train_loss": self.losses[r]}
        return SimpleNamespace(global_variables=g, round=r + 1), m


def test_differences_ties_and_equal_rounds_are_reported(tmp_path, monkeypatch, experiment_script):
    mod = experiment_script("compare_first_rounds")
    a = _run_folder(tmp_path / "a", "fedavg", "c1")
    b = _run_folder(tmp_path / "b", "fldetector", "c2")
    one = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    bumped = {"w": one["w"].copy(), "b": np.array([0.0, 0.25, 0.0], np.float32)}
    bumped["w"][1, 2] += 1e-3
    sims = {
        "fedavg": _Sim([one, one], [[1, 1, 0], [1, 1, 1]], [0.5, 0.4]),
        "fldetector": _Sim([one, bumped], [[1, 1, 0], [1, 0, 1]], [0.5, 0.3]),
    }
    built = []

    def build(cfg, data):
        built.append(cfg.defense.name)
        return sims[cfg.defense.name]

    monkeypatch.setattr(mod.simulation, "build", build)
    monkeypatch.setattr(mod, "load_dataset", lambda *a, **k: None)
    rec = mod.compare(a, b, rounds=2)
    assert built == ["fedavg", "fldetector"] and rec["runs_commits"] == ["c1", "c2"]
    r0, r1 = rec["rounds"]
    assert r0["same_accepted"] and r0["bitwise_equal"] and r0["max_abs_diff"] == 0.0
    assert r0["train_loss"] == [0.5, 0.5]
    assert not r1["same_accepted"] and not r1["bitwise_equal"]
    # leaves in tree order: params/b, params/w
    np.testing.assert_allclose(r1["max_abs_diff_per_leaf"], [0.25, 1e-3], rtol=1e-4)
    assert r1["max_abs_diff"] == max(r1["max_abs_diff_per_leaf"])
    np.testing.assert_allclose(r1["max_abs_value_per_leaf"], [0.0, 2.0])
    assert mod.compare(a, a, rounds=1)["rounds"][0]["bitwise_equal"]
    assert built[-1:] == ["fedavg"]  # a run compared with itself is built once
