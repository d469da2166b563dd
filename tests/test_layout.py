"""The package layout: no import circle between checkpoint and simulation or between the two CLI
modules, and the names that moved still import from where they were."""

from __future__ import annotations

import ast
import pathlib

import marsjax

PACKAGE = pathlib.Path(marsjax.__file__).parent


def _imported(module: str, skip_functions: tuple[str, ...] = ()) -> set[str]:
    """The marsjax modules ``module`` imports anywhere in its code (top level or inside
    functions), except inside the functions named in ``skip_functions``."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef) and f.name in skip_functions
        for n in ast.walk(f)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("marsjax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("marsjax"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_checkpoint_does_not_import_simulation():
    # only the compatibility alias checkpoint.run_resumable looks simulation up, on first use
    assert "marsjax.simulation" not in _imported("marsjax.checkpoint", ("__getattr__",))


def test_cli_experiments_does_not_import_cli():
    assert not {m for m in _imported("marsjax.cli_experiments") if m in ("marsjax.cli",)}
    assert "marsjax.cli" not in _imported("marsjax.cli_common")


def test_moved_names_still_import_from_their_old_places():
    from marsjax import checkpoint, cli, cli_common, simulation, sweep
    from marsjax.sweep import (  # noqa: F401 (the names the package re-exports)
        COLUMNS,
        MixedCommitsError,
        PretrainSpec,
        Sweep,
        SweepRun,
        collect,
        expand,
        load_sweep,
        run_sweep,
        write_outputs,
    )

    assert checkpoint.run_resumable is simulation.run_resumable
    assert cli.load_config is cli_common.load_config
    assert set(sweep.__all__) <= set(dir(sweep))


def test_mars_has_its_own_package_and_the_old_paths_are_the_same_modules():
    import marsjax.defenses._mars as old_defense
    import marsjax.defenses.clustering as old_clustering
    import marsjax.defenses.energy as old_energy
    import marsjax.defenses.wasserstein as old_wasserstein
    from marsjax import defenses, mars

    assert old_energy is mars.energy and old_defense is mars.defense
    assert old_clustering is mars.clustering and old_wasserstein is mars.wasserstein
    assert defenses.REGISTRY["mars"] is mars.defense._build
    assert defenses.mars is mars.mars and defenses.backdoor_energy is mars.backdoor_energy
    assert marsjax.mars is mars
    # the baselines stay where they were
    assert all(
        defenses.REGISTRY[n].__module__.startswith("marsjax.defenses.")
        for n in defenses.REGISTRY
        if not n.startswith("mars") and not n.startswith("_")
    )
