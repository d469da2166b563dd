"""The ``marsjax`` command.

    marsjax run CONFIG [--set section.field=value ...] [--defenses fedavg,mars] [--out DIR]
    marsjax validate CONFIG [--set ...]
    marsjax presets

``CONFIG`` is a preset name (``marsjax presets``) or a Python file defining ``get_config()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import sys
from collections.abc import Sequence

from marsjax.config import (
    PRESETS,
    ConfigError,
    ExperimentConfig,
    get_preset,
    override,
    parse_overrides,
    validate,
)

__all__ = ["main", "load_config"]


def load_config(spec: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A preset name or a ``.py`` file with ``get_config()``, then dotted overrides."""
    path = pathlib.Path(spec)
    if spec.endswith(".py"):
        if not path.exists():
            raise ConfigError(f"config file {spec!r} not found")
        module_spec = importlib.util.spec_from_file_location(f"_marsjax_cfg_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file {spec!r} defines no get_config()")
        cfg = module.get_config()
    elif spec in PRESETS:
        cfg = get_preset(spec)
    else:
        raise ConfigError(
            f"config {spec!r} is neither a .py file nor a preset; presets: {sorted(PRESETS)}"
        )
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"{spec}: get_config() must return an ExperimentConfig")
    return override(cfg, parse_overrides(overrides))


def _print_table(summaries: list[dict]) -> None:
    from marsjax.report import summary_markdown

    print()
    print(summary_markdown(summaries), end="")


def _cmd_run(args) -> int:
    cfg = load_config(args.config, args.set)
    if args.out:
        cfg = override(cfg, {"run.out_dir": args.out})
    names = [d for d in (args.defenses or "").split(",") if d] or [cfg.defense.name]
    cfgs = []
    for name in names:
        c = cfg
        if name != cfg.defense.name:
            c = dataclasses.replace(
                cfg, defense=dataclasses.replace(cfg.defense, name=name, options={})
            )
        if c.run.out_dir and len(names) > 1:
            c = override(c, {"run.out_dir": str(pathlib.Path(c.run.out_dir) / name)})
        c = dataclasses.replace(c, name=f"{cfg.name}[{name}]" if len(names) > 1 else c.name)
        validate(c)  # every variant is checked before the first one compiles
        cfgs.append(c)
    from marsjax import simulation

    summaries = []
    dataset = None
    for c in cfgs:
        res = simulation.run(c, dataset=dataset, progress=not args.quiet)
        dataset = res["sim"].dataset
        summaries.append(res["summary"])
    print(
        f"\n{cfg.name}: {cfg.data.name}, {cfg.model.name}, attack={cfg.attack.name}, "
        f"{cfg.run.rounds} rounds, {cfg.run.clients_per_round} clients/round"
    )
    _print_table(summaries)
    print(
        "ACC/ASR: last round; TPR/FPR: mean over attack rounds; CAD = (ACC + 100-ASR + TPR + "
        "100-FPR)/4 (all %)."
    )
    if cfg.run.out_dir:
        print(f"results: {cfg.run.out_dir}")
    return 0


def _cmd_validate(args) -> int:
    cfg = load_config(args.config, args.set)
    validate(cfg)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    print("config OK", file=sys.stderr)
    return 0


def _cmd_presets(args) -> int:
    for name in sorted(PRESETS):
        doc = (PRESETS[name].__doc__ or "").strip().splitlines()[0]
        print(f"{name:24s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="marsjax", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add_config_args(sp):
        sp.add_argument("config", help="preset name or Python file with get_config()")
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field, e.g. --set defense.name=mars (repeatable)",
        )

    sp = sub.add_parser("run", help="run an experiment")
    add_config_args(sp)
    sp.add_argument("--defenses", help="comma-separated defenses to run the same config with")
    sp.add_argument("--out", help="results folder (overrides run.out_dir)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(fn=_cmd_run)

    sp = sub.add_parser("validate", help="check a config without running it")
    add_config_args(sp)
    sp.set_defaults(fn=_cmd_validate)

    sp = sub.add_parser("presets", help="list the named presets")
    sp.set_defaults(fn=_cmd_presets)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"marsjax: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from marsjax.data import DatasetError

        if isinstance(e, DatasetError):
            print(f"marsjax: dataset error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
