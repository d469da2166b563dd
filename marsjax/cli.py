"""The ``marsjax`` command.

    marsjax run CONFIG [--set section.field=value ...] [--defenses fedavg,mars] [--out DIR]
                       [--checkpoint-every K] [--keep-checkpoints N]
    marsjax run [CONFIG] --resume DIR [--set ...]
    marsjax run CONFIG --distributed [--coordinator HOST:PORT --num-processes N --process-id I]
    marsjax validate CONFIG [--set ...] [--data] [--trace] [--resume DIR]
    marsjax presets
    marsjax sweep SWEEP.py [--only AXIS=LABEL ...] [--set ...] [--list]
    marsjax pretrain CONFIG [--out DIR] [--target-acc ACC]
    marsjax plot RESULTS_DIR

``sweep``, ``pretrain`` and ``plot`` are described in :mod:`marsjax.cli_experiments`.
``CONFIG`` is a preset name (``marsjax presets``) or a Python file defining ``get_config()``.

Checkpoints (``marsjax.checkpoint``): with ``run.checkpoint_every = K`` (``--checkpoint-every K``)
and a results folder, the run saves its whole state every K rounds and after the last one under
``DIR/checkpoints``. ``--resume DIR`` continues the run of the results folder ``DIR`` from its
latest checkpoint; without CONFIG the checkpoint's own config is used (``--set run.rounds=N``
extends it), with CONFIG the two must describe the same experiment, or the run is refused naming
the differing fields. With ``--defenses`` each defense resumes from ``DIR/<defense>``, and the
ones that had not started yet start.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import sys
import traceback
from collections.abc import Sequence

from marsjax.config import (
    PRESETS,
    ConfigError,
    ExperimentConfig,
    from_dict,
    get_preset,
    override,
    parse_overrides,
    validate,
)
from marsjax.data.datasets import DatasetError

__all__ = ["load_config", "main"]


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


def _saved_config(directory: str) -> ExperimentConfig:
    """The config stored in the latest checkpoint of the results folder ``directory``."""
    from marsjax import checkpoint

    return from_dict(checkpoint.read_meta(directory)["config"])


def _run_config(args) -> ExperimentConfig:
    if args.config is None:
        if not args.resume:
            raise ConfigError("give a CONFIG (preset name or .py file), or --resume DIR")
        cfg = override(_saved_config(args.resume), parse_overrides(args.set))
    else:
        cfg = load_config(args.config, args.set)
    if args.resume and args.out and args.out != args.resume:
        raise ConfigError("--out and --resume name different folders; --resume DIR writes to DIR")
    if args.out or args.resume:
        cfg = override(cfg, {"run.out_dir": args.out or args.resume})
    if args.checkpoint_every is not None:
        cfg = override(cfg, {"run.checkpoint_every": args.checkpoint_every})
    return cfg


def _check_checkpointing(c: ExperimentConfig) -> None:
    if c.run.checkpoint_every and not c.run.out_dir:
        raise ConfigError(
            f"run.out_dir=None is invalid with run.checkpoint_every={c.run.checkpoint_every}: "
            "checkpoints need a results folder (--out DIR)"
        )
    if c.run.init_checkpoint is not None and not pathlib.Path(c.run.init_checkpoint).exists():
        raise ConfigError(
            f"run.init_checkpoint={c.run.init_checkpoint!r} is invalid: no such folder"
        )


def _has_checkpoint(c: ExperimentConfig) -> bool:
    from marsjax import checkpoint

    return bool(c.run.out_dir) and checkpoint.latest_round(c.run.out_dir) is not None


def _start_distributed(args) -> None:
    """``--distributed``: join the multi-process runtime before anything touches JAX."""
    from marsjax import sharding

    sharding.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    if jax.process_index() != 0:  # one process writes files and draws the progress bar
        args.quiet = True
        args.out = None


def _cmd_run(args) -> int:
    if args.distributed:
        if args.checkpoint_every or args.resume:
            raise ConfigError(
                "--distributed with checkpoints is not supported yet (multi-process "
                "checkpointing is untested); drop --checkpoint-every/--resume"
            )
        _start_distributed(args)
    cfg = _run_config(args)
    if args.distributed:
        import jax

        if jax.process_index() != 0:
            cfg = override(cfg, {"run.out_dir": None})
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
        _check_checkpointing(c)
        cfgs.append(c)
    from marsjax import checkpoint

    resume = [bool(args.resume) and _has_checkpoint(c) for c in cfgs]
    if args.resume and not any(resume):
        raise checkpoint.CheckpointError(f"nothing to resume: no checkpoint in {args.resume}")
    summaries = []
    dataset = None
    for c, res_c in zip(cfgs, resume):
        if args.resume and not res_c:
            print(f"{c.name}: no checkpoint in {c.run.out_dir}, starting it", file=sys.stderr)
        elif res_c:
            print(
                f"{c.name}: resuming {c.run.out_dir} from its checkpoint of round "
                f"{checkpoint.latest_round(c.run.out_dir)}",
                file=sys.stderr,
                flush=True,
            )
        res = checkpoint.run_resumable(
            c,
            resume=res_c,
            dataset=dataset,
            progress=not args.quiet,
            keep=args.keep_checkpoints,
        )
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
    if args.resume:
        cfg = override(cfg, {"run.out_dir": args.resume})
    validate(cfg)
    _check_checkpointing(cfg)
    checks = ["fields"]
    if args.resume:
        from marsjax import checkpoint

        ckpt_dir = checkpoint.find_checkpoint_dir(args.resume)
        meta = checkpoint.read_meta(ckpt_dir)
        for w in checkpoint.check_resumable(meta["config"], cfg, meta["round"]):
            print(f"marsjax: warning: {w}", file=sys.stderr)
        checks.append(f"resumes {ckpt_dir} (round {meta['round']})")
    if args.data or args.trace:
        from marsjax.data import load_dataset

        ds = load_dataset(cfg.data.name, cfg.data.data_dir, cfg.data.source)
        checks.append(f"dataset {ds.name} ({len(ds.y_train)} train, {len(ds.y_test)} test)")
        if args.trace:
            _trace(cfg, ds)
            checks.append("round traced")
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    print(f"config OK: {', '.join(checks)}", file=sys.stderr)
    return 0


def _trace(cfg: ExperimentConfig, ds) -> None:
    """Builds the simulation and traces its compiled functions (no compilation, no rounds)."""
    import jax

    from marsjax import simulation

    try:
        sim = simulation.build(cfg, ds)
        state = sim.init_state()
    except (ConfigError, DatasetError):
        raise
    except Exception as e:
        raise _factory_error(e) or _TraceError(f"does not build: {type(e).__name__}: {e}") from e
    try:
        jax.eval_shape(sim.round_step, state, sim.data)
        if cfg.run.rounds_per_call > 1:
            jax.eval_shape(sim.multi_round_step, state, sim.data)
        jax.eval_shape(
            sim.evaluate, state.global_variables, state.attack_state, sim.x_test, sim.y_test
        )
    except Exception as e:
        raise _TraceError(f"its round does not trace: {type(e).__name__}: {e}") from e


class _TraceError(Exception):
    """The config validates but the experiment does not build or trace."""


def _factory_error(e: BaseException) -> ConfigError | None:
    """A ConfigError naming the fields when ``e`` is an attack or defense factory rejecting its
    options or the rest of the config (a ValueError or TypeError raised inside ``make``)."""
    if not isinstance(e, (ValueError, TypeError)):
        return None
    for frame, _ in traceback.walk_tb(e.__traceback__):
        module = frame.f_globals.get("__name__")
        if frame.f_code.co_name == "make" and module in ("marsjax.attacks", "marsjax.defenses"):
            section = module.rsplit(".", 1)[1][:-1]
            name, options = frame.f_locals.get("name"), frame.f_locals.get("options")
            return ConfigError(
                f"{section}.name={name!r} with {section}.options={options!r} is invalid: the "
                f"{section} rejects this config: {e}"
            )
    return None


def _cmd_presets(args) -> int:
    for name in sorted(PRESETS):
        doc = (PRESETS[name].__doc__ or "").strip().splitlines()[0]
        print(f"{name:24s} {doc}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="marsjax", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def add_config_args(sp, optional=False):
        sp.add_argument(
            "config",
            nargs="?" if optional else None,
            help="preset name or Python file with get_config()"
            + (" (with --resume: default the checkpoint's config)" if optional else ""),
        )
        sp.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a field, e.g. --set defense.name=mars (repeatable)",
        )

    sp = sub.add_parser("run", help="run an experiment")
    add_config_args(sp, optional=True)
    sp.add_argument("--defenses", help="comma-separated defenses to run the same config with")
    sp.add_argument("--out", help="results folder (overrides run.out_dir)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run of results folder DIR from its latest checkpoint",
    )
    sp.add_argument(
        "--checkpoint-every",
        type=int,
        metavar="K",
        help="save a checkpoint every K rounds (sets run.checkpoint_every; needs --out)",
    )
    sp.add_argument(
        "--keep-checkpoints",
        type=_positive_int,
        default=2,
        metavar="N",
        help="keep the latest N checkpoints (default 2)",
    )
    sp.add_argument(
        "--distributed",
        action="store_true",
        help="multi-process run (jax.distributed): every process runs the same command; the "
        "client axis spans all processes' devices. On TPU pods / SLURM / Open MPI the cluster is "
        "detected; else give --coordinator, --num-processes and --process-id",
    )
    sp.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    sp.add_argument("--num-processes", type=_positive_int, metavar="N")
    sp.add_argument("--process-id", type=int, metavar="I")
    sp.set_defaults(fn=_cmd_run)

    sp = sub.add_parser("validate", help="check a config without running it")
    add_config_args(sp)
    sp.add_argument(
        "--data", action="store_true", help="also load the dataset (missing or corrupt files)"
    )
    sp.add_argument(
        "--trace",
        action="store_true",
        help="also build the experiment and trace one round (shapes; nothing is compiled or run)",
    )
    sp.add_argument(
        "--resume", metavar="DIR", help="also check that CONFIG may resume the run in DIR"
    )
    sp.set_defaults(fn=_cmd_validate)

    sp = sub.add_parser("presets", help="list the named presets")
    sp.set_defaults(fn=_cmd_presets)

    from marsjax import cli_experiments  # sweep, pretrain, plot

    cli_experiments.add_subcommands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``marsjax`` command; returns the exit status (2: bad config, data or checkpoint).

    Args:
      argv: the arguments (default ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"marsjax: config error: {e}", file=sys.stderr)
        return 2
    except DatasetError as e:
        print(f"marsjax: dataset error: {e}", file=sys.stderr)
        return 2
    except _TraceError as e:
        print(f"marsjax: the config validates but the experiment {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from marsjax.checkpoint import CheckpointError

        if isinstance(e, CheckpointError):
            print(f"marsjax: checkpoint error: {e}", file=sys.stderr)
            return 2
        factory = _factory_error(e)
        if factory is not None:
            print(f"marsjax: config error: {factory}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
