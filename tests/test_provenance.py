"""Every results folder records the code and environment that made it."""

import json
import pathlib
import subprocess

from marsjax import provenance, simulation
from marsjax.checkpoint import config_diff
from marsjax.config import get_preset, override, to_dict
from marsjax.data import load_dataset

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _git_head():
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def test_provenance_names_the_commit_versions_and_command(monkeypatch, tmp_path):
    provenance.git_state.cache_clear()  # HEAD may have moved since this process first asked
    monkeypatch.chdir(tmp_path)
    p = provenance.provenance(["/some/where/bin/marsjax", "run", str(tmp_path / "cfg.py")])
    assert p["commit"] == _git_head()
    if p["commit"] is not None:
        assert len(p["commit"]) == 40 and isinstance(p["dirty"], bool)
    assert p["versions"]["jax"] and p["versions"]["marsjax"]
    assert p["command"] == "marsjax run cfg.py"  # no machine path
    assert p["device"]["backend"] == "cpu"


def test_results_folder_records_provenance(tmp_path):
    provenance.git_state.cache_clear()
    cfg = override(
        get_preset("demo", defense="fedavg"),
        {
            "run.rounds": 2,
            "run.eval_every": 2,
            "run.out_dir": str(tmp_path / "run"),
            "model.name": "mlp",
            "data.num_clients": 10,
            "run.clients_per_round": 4,
            "attack.num_attackers": 2,
            "attack.attackers_per_round": 1,
        },
    )
    simulation.run(cfg, dataset=load_dataset("digits"), progress=False)
    saved_cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    head = _git_head()
    for rec in (saved_cfg, summary):
        assert rec["commit"] == head
        assert rec["provenance"]["commit"] == head
        assert rec["provenance"]["versions"]["jax"]
    # provenance is not part of the config: the saved config still matches the run's
    assert config_diff(saved_cfg, to_dict(cfg)) == []
    assert config_diff({**saved_cfg, "run": {**saved_cfg["run"], "seed": 9}}, to_dict(cfg)) == [
        "run.seed"
    ]


def test_dirty_flag_follows_tracked_changes(monkeypatch):
    provenance.git_state.cache_clear()
    calls = []

    def fake_git(args, cwd):
        calls.append(args)
        return {"rev-parse": "a" * 40, "status": " M marsjax/x.py"}[args[0]]

    monkeypatch.setattr(provenance, "_git", fake_git)
    try:
        assert provenance.git_state() == {"commit": "a" * 40, "dirty": True}
        provenance.git_state.cache_clear()
        monkeypatch.setattr(
            provenance, "_git", lambda a, c: {"rev-parse": "b" * 40, "status": ""}[a[0]]
        )
        assert provenance.git_state() == {"commit": "b" * 40, "dirty": False}
        assert any(c[:3] == ["status", "--porcelain", "--untracked-files=no"] for c in calls)
    finally:
        provenance.git_state.cache_clear()


def test_no_checkout_gives_none(monkeypatch):
    provenance.git_state.cache_clear()
    monkeypatch.setattr(provenance, "_git", lambda a, c: None)
    try:
        assert provenance.git_state() == {"commit": None, "dirty": None}
    finally:
        provenance.git_state.cache_clear()


def test_changed_results_do_not_make_the_tree_dirty(tmp_path):
    """A results folder replaced by a rerun is not a code change; a source file is."""
    import shutil

    repo = tmp_path / "repo"
    (repo / "marsjax").mkdir(parents=True)
    (repo / "experiments" / "results").mkdir(parents=True)
    (repo / "marsjax" / "m.py").write_text("x = 1\n")
    (repo / "experiments" / "results" / "r.json").write_text("{}\n")
    run = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)
    run("init", "-q")
    run("-c", "user.email=a@b", "-c", "user.name=a", "add", ".")
    run("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x")
    status = lambda: provenance._git(
        ["status", "--porcelain", "--untracked-files=no", "--", *provenance._CODE_PATHS], repo
    )
    shutil.rmtree(repo / "experiments" / "results")
    assert status() == ""
    (repo / "marsjax" / "m.py").write_text("x = 2\n")
    assert status() != ""
