"""The ``marsjax sweep``, ``marsjax pretrain`` and ``marsjax plot`` subcommands.

    marsjax sweep SWEEP.py [--only AXIS=LABEL[,LABEL...] ...] [--set section.field=value ...]
                           [--list] [--redo-changed] [--progress] [--results DIR]
    marsjax pretrain CONFIG [--out DIR] [--target-acc ACC] [--max-rounds N] [--eval-every K]
                            [--set ...]
    marsjax plot RESULTS_DIR | SWEEP.py [--results DIR]

The relative paths of a sweep file (its results folder, its pretrained start) are relative to the
project that holds the file: the nearest folder above it with ``pyproject.toml`` or ``.git``
(:func:`marsjax.sweep.project_root`; for ``experiments/configs/*.py``, the repository root), so
``sweep`` and ``plot`` find the same runs from any working directory; ``--results DIR`` names
another results folder. Paths given with ``--set`` (``data.data_dir``, ``run.init_checkpoint``)
are relative to the working directory, as usual. ``--only`` filters ``--list`` too, and an
unknown axis or label is refused with the closest one.

``SWEEP.py`` defines ``get_sweep()`` returning a :class:`marsjax.sweep.Sweep`; a sweep reruns
nothing that is done, resumes what has a checkpoint, pretrains its clean start first when it has
one, and writes ``table.md``, ``table.csv``, ``heatmap_cad.png`` and ``curves_*.png`` into its
results folder. ``CONFIG`` of ``pretrain`` is a preset or a ``.py`` file with ``get_config()``
(and optionally ``get_pretrain()`` returning a :class:`marsjax.pretrain.PretrainSpec`, whose
values the flags override). ``plot`` rewrites the tables and plots of a sweep from its files.

:func:`add_subcommands` adds the three to the ``marsjax`` parser; ``python -m
marsjax.cli_experiments ...`` runs them on their own.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import sys
from collections.abc import Sequence

from marsjax.cli_common import load_config, run_command
from marsjax.config import ConfigError, call_file_function

__all__ = ["add_subcommands", "main"]

# --set fields that hold paths: given on the command line, they are relative to where the
# command runs, not to the sweep's project folder.
_PATH_FIELDS = ("data.data_dir", "run.init_checkpoint", "run.out_dir")


def _parse_only(items: Sequence[str]) -> dict[str, list[str]]:
    only: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--only {item!r} must look like AXIS=LABEL[,LABEL...]")
        axis, labels = item.split("=", 1)
        only.setdefault(axis.strip(), []).extend(x.strip() for x in labels.split(",") if x)
    return only


def _from_root(path: str, root: pathlib.Path) -> str:
    """``path`` (relative to the working directory) as the sweep sees it from ``root``: relative
    to ``root`` when inside it (so that configs record the same relative paths wherever the
    command runs), absolute otherwise."""
    p = pathlib.Path(path).resolve()
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return str(p)


def _rebase_sets(sets: Sequence[str], root: pathlib.Path) -> list[str]:
    out = []
    for item in sets:
        key, sep, value = item.partition("=")
        if sep and key.strip() in _PATH_FIELDS and value and value.lower() not in ("none", "null"):
            item = f"{key}={_from_root(value, root)}"
        out.append(item)
    return out


@contextlib.contextmanager
def _working_dir(folder: pathlib.Path):
    before = pathlib.Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextlib.contextmanager
def _sweep_at_root(args):
    """Loads the sweep of ``args.spec`` inside its project folder
    (:func:`marsjax.sweep.project_root`), where its relative paths (results folder, pretrained
    start) point, whatever the working directory; ``--results DIR`` replaces its results
    folder. Yields ``(sweep, shown)``: ``shown`` turns a path of the sweep into one that reads
    from the caller's working directory."""
    from marsjax import sweep as sweep_lib

    spec = pathlib.Path(args.spec)
    if not spec.is_file():
        raise ConfigError(f"sweep file {args.spec!r} not found")
    caller = pathlib.Path.cwd()
    root = sweep_lib.project_root(spec)
    sets = _rebase_sets(getattr(args, "set", []), root)
    results = _from_root(args.results, root) if getattr(args, "results", None) else None
    with _working_dir(root):
        try:
            sweep = sweep_lib.load_sweep(spec.resolve(), sets)
        except ConfigError as e:  # name the file as the caller gave it
            raise ConfigError(str(e).replace(str(spec.resolve()), args.spec)) from None
        if results is not None:
            sweep = dataclasses.replace(sweep, out_dir=results)

        def shown(path) -> str:
            return os.path.relpath(root / path, caller)

        yield sweep, shown


def _cmd_sweep(args) -> int:
    from marsjax import sweep as sweep_lib

    only = _parse_only(args.only)
    with _sweep_at_root(args) as (sweep, shown):
        if args.list:
            pretrained = sweep.pretrain.out_dir if sweep.pretrain else None
            runs = sweep_lib.select(sweep, sweep_lib.expand(sweep, pretrained), only)
            for r in runs:
                print(f"{sweep_lib.status(r):8s} {shown(r.out_dir)}")
            return 0
        result = sweep_lib.run_sweep(
            sweep,
            only=only,
            progress=args.progress,
            redo_changed=args.redo_changed,
            allow_mixed_commits=args.allow_mixed_commits,
        )
        table = pathlib.Path(result.outputs["table.md"])
        print(table.read_text())
        print(f"results: {shown(sweep.results_dir)}")
    if result.failed:
        for rid, why in result.failed.items():
            print(f"marsjax: run {rid} failed: {why}", file=sys.stderr)
        return 1
    return 0


def _load_module_attr(spec: str, name: str):
    """``name()`` of the config file ``spec`` (``None`` when ``spec`` is a preset or the file
    does not define it)."""
    if not spec.endswith(".py"):
        return None
    return call_file_function(spec, name, required=False)


def _cmd_pretrain(args) -> int:
    from marsjax.pretrain import PretrainSpec, pretrain

    cfg = load_config(args.config, args.set)
    spec = _load_module_attr(args.config, "get_pretrain")
    if spec is not None and not isinstance(spec, PretrainSpec):
        raise ConfigError(f"{args.config}: get_pretrain() must return a PretrainSpec")
    out = args.out or (spec.out_dir if spec else None)
    if out is None:
        raise ConfigError("give --out DIR (the config defines no get_pretrain())")
    target = args.target_acc if args.target_acc is not None else (spec and spec.target_acc)
    res = pretrain(
        cfg,
        out,
        target_acc=target or None,
        max_rounds=args.max_rounds or (spec.max_rounds if spec else None),
        eval_every=args.eval_every or (spec.eval_every if spec else None),
        progress=not args.quiet,
    )
    state = "already done" if res.skipped else f"{res.wall_s:.0f}s"
    print(
        f"pretrained {cfg.name}: round {res.rounds}, ACC {res.acc:.2f}, ASR {res.asr:.2f}"
        + (
            f" (target {res.target_acc:.2f}: {'reached' if res.reached else 'NOT reached'})"
            if res.target_acc is not None
            else ""
        )
        + f"; {state}"
    )
    print(f"checkpoint: {pathlib.Path(out) / res.checkpoint}  (run.init_checkpoint={out})")
    return 0


def _cmd_plot(args) -> int:
    from marsjax import sweep as sweep_lib

    if args.target.endswith(".py"):
        args.spec = args.target
        with _sweep_at_root(args) as (sweep, shown):
            outputs = sweep_lib.write_outputs(
                sweep.results_dir, allow_mixed_commits=args.allow_mixed_commits
            )
            outputs = {k: shown(v) for k, v in outputs.items()}
    else:
        if args.results:
            raise ConfigError("--results goes with a sweep file; give the results folder itself")
        outputs = sweep_lib.write_outputs(args.target, allow_mixed_commits=args.allow_mixed_commits)
    print(json.dumps(outputs, indent=2))
    return 0


_MIXED_HELP = (
    "write the tables even if the finished runs were made by different commits (each cell then "
    "names its commits); by default that is refused"
)


_RESULTS_HELP = (
    "the sweep's results folder (default: its out_dir, relative to the project folder holding "
    "the sweep file, whatever the working directory)"
)


def add_subcommands(subparsers) -> None:
    """Adds ``sweep``, ``pretrain`` and ``plot`` to the ``marsjax`` subparsers.

    Each parser sets ``fn`` (called with the parsed arguments; returns the exit status), as the
    other ``marsjax`` subcommands do.
    """
    sp = subparsers.add_parser("sweep", help="run a grid of experiments (a get_sweep() file)")
    sp.add_argument("spec", help="Python file with get_sweep()")
    sp.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="AXIS=LABEL[,LABEL]",
        help="run only these points (e.g. --only defense.name=mars,fedavg; 'seed' is an axis)",
    )
    sp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the sweep's base config (e.g. data.data_dir=DIR)",
    )
    sp.add_argument("--list", action="store_true", help="list the runs and their status, run none")
    sp.add_argument(
        "--redo-changed", action="store_true", help="rerun finished runs whose config changed"
    )
    sp.add_argument("--progress", action="store_true", help="a progress bar per run")
    sp.add_argument("--allow-mixed-commits", action="store_true", help=_MIXED_HELP)
    sp.add_argument("--results", metavar="DIR", help=_RESULTS_HELP)
    sp.set_defaults(fn=_cmd_sweep)

    sp = subparsers.add_parser(
        "pretrain", help="clean FedAvg to a target accuracy, saved as a starting checkpoint"
    )
    sp.add_argument("config", help="preset name or Python file with get_config()")
    sp.add_argument("--out", help="results folder (default: the config's get_pretrain())")
    sp.add_argument("--target-acc", type=float, help="stop at this test accuracy (%%)")
    sp.add_argument("--max-rounds", type=int, help="the most rounds")
    sp.add_argument("--eval-every", type=int, help="evaluate and checkpoint every K rounds")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=_cmd_pretrain)

    sp = subparsers.add_parser("plot", help="rewrite a sweep's tables and plots from its files")
    sp.add_argument("target", help="a sweep results folder, or the sweep's .py file")
    sp.add_argument("--allow-mixed-commits", action="store_true", help=_MIXED_HELP)
    sp.add_argument("--results", metavar="DIR", help=_RESULTS_HELP)
    sp.set_defaults(fn=_cmd_plot)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m marsjax.cli_experiments {sweep,pretrain,plot} ...``; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="marsjax", description="marsjax's experiment commands: sweep, pretrain, plot."
    )
    add_subcommands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return run_command(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
