"""Every committed experiment config loads and validates, and every sweep expands to valid runs.

The paper-scale configs need a GPU and data this machine lacks, so they are never run in CI; this
test at least keeps them in step with the config schema (a renamed field or option fails here, not
on a GPU host). It runs from the repository root because the configs name paths relative to it.
"""

import pathlib

import pytest

from marsjax.cli import load_config
from marsjax.cli_experiments import _load_module_attr
from marsjax.config import validate
from marsjax.sweep import expand, load_sweep

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in (ROOT / "experiments" / "configs").glob("*.py") if p.stem[0] != "_")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_experiment_config_validates_and_its_sweep_expands(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    rel = str(path.relative_to(ROOT))
    has_config = _load_module_attr(rel, "get_config") is not None
    has_sweep = _load_module_attr(rel, "get_sweep") is not None
    assert has_config or has_sweep, f"{rel} defines neither get_config() nor get_sweep()"
    if has_config:
        cfg = validate(load_config(rel))
        if cfg.run.init_checkpoint is not None:  # a committed clean start must exist
            assert (ROOT / cfg.run.init_checkpoint).is_dir(), cfg.run.init_checkpoint
    if has_sweep:
        sweep = load_sweep(rel)
        runs = expand(sweep)
        assert runs, f"{rel}: empty sweep"
        assert len({r.id for r in runs}) == len(runs)
        # Every run writes under the sweep's results folder, and its grid labels are applied.
        for r in runs:
            assert r.config.run.out_dir.startswith(sweep.results_dir.as_posix())
            for axis, label in r.labels.items():
                if axis in ("attack.name", "defense.name"):
                    section, field = axis.split(".")
                    assert getattr(getattr(r.config, section), field) == label
