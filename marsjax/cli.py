"""The ``marsjax`` command.

    marsjax run CONFIG [--set section.field=value ...] [--defenses fedavg,mars] [--seeds 0,1,2]
                       [--out DIR [--overwrite]] [--tensorboard DIR]
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

Names and options: ``--set defense.name=X`` (or ``attack.name``) starts that section from X's
own options: on a preset, the preset made for X (``get_preset(name, defense=X)``: ``quickstart``
gives MARS and MARS* its epsilon 0.1), elsewhere X's defaults; options set in the same command
apply on top. ``--defenses A,B`` runs each as ``--set defense.name=A`` would, in ``DIR/A`` and
``DIR/B``.
``--seeds 0,1,2`` runs each seed (one after another; a seed changes the partition, so the runs
do not share a compiled program) in ``DIR[/<defense>]/s<seed>`` and prints, and writes to
``DIR/summary_seeds.{json,md}``, the mean ± std over the seeds of every metric.

Results folder: ``--out DIR`` refuses a folder that already holds a run unless ``--overwrite``
(which removes what a run writes there, checkpoints included) or ``--resume``. Besides
``config.json``, ``metrics.jsonl``, ``summary.json``, ``summary.md`` and ``curves.png``, a run
writes ``metrics.csv``; ``--tensorboard DIR`` adds TensorBoard event files
(``DIR[/<defense>][/s<seed>]``).
Off a terminal, progress is one log line every few rounds.

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
import json
import pathlib
import sys
from collections.abc import Sequence

from marsjax.cli_common import TraceError, factory_error, load_config, run_command
from marsjax.config import (
    PRESETS,
    ConfigError,
    ExperimentConfig,
    from_dict,
    override,
    parse_overrides,
    validate,
)
from marsjax.data.datasets import DatasetError

__all__ = ["build_parser", "load_config", "main"]

# Kept for code that imported them from here.
_TraceError = TraceError
_factory_error = factory_error

# What a run writes into its results folder (``--overwrite`` removes these and nothing else).
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "metrics.csv",
    "summary.json",
    "summary.md",
    "curves.png",
    "plot_error.txt",
    "error.txt",
    "summary_seeds.json",
    "summary_seeds.md",
)


def _print_table(summaries: list[dict]) -> None:
    from marsjax.report import summary_markdown

    print()
    print(summary_markdown(summaries), end="")


def _saved_config(directory: str) -> ExperimentConfig:
    """The config stored in the latest readable checkpoint of the results folder ``directory``."""
    from marsjax import checkpoint

    return from_dict(checkpoint.read_meta(directory)["config"])


def _parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            seed = int(part)
        except ValueError:
            seed = -1
        if seed < 0:
            raise ConfigError(
                f"--seeds {text!r}: {part!r} is not a seed (integers >= 0, e.g. 0,1,2)"
            )
        if seed in seeds:
            raise ConfigError(f"--seeds {text!r}: seed {seed} is given twice")
        seeds.append(seed)
    if not seeds:
        raise ConfigError(f"--seeds {text!r}: give at least one seed (e.g. --seeds 0,1,2)")
    return seeds


@dataclasses.dataclass
class _Variant:
    """One run of a ``marsjax run`` command: a defense of ``--defenses`` x a seed of ``--seeds``;
    ``parts`` name its subfolder of ``--out`` (empty for a single run)."""

    parts: list[str]
    sets: list[str]
    seed: int | None = None


def _variants(args) -> list[_Variant]:
    names = [d.strip() for d in (args.defenses or "").split(",") if d.strip()]
    seeds = _parse_seeds(args.seeds) if args.seeds is not None else []
    out = []
    for name in names or [None]:
        for seed in seeds or [None]:
            sets = list(args.set)
            if name is not None:
                sets.append(f"defense.name={name}")  # the same as --set defense.name=NAME
            if seed is not None:
                sets.append(f"run.seed={seed}")
            parts = ([name] if len(names) > 1 else []) + ([f"s{seed}"] if len(seeds) > 1 else [])
            out.append(_Variant(parts, sets, seed))
    return out


def _resume_source(args, variants: list[_Variant]) -> str:
    """Without CONFIG: the folder whose checkpoint gives the config (the variant's own, else the
    first variant's that has one)."""
    for v in variants:
        folder = str(pathlib.Path(args.resume, *v.parts))
        if _has_checkpoint_in(folder):
            return folder
    raise _nothing_to_resume(args.resume)


def _nothing_to_resume(folder: str):
    from marsjax import checkpoint

    return checkpoint.CheckpointError(f"nothing to resume: no checkpoint in {folder}")


def _variant_config(args, v: _Variant, variants: list[_Variant]) -> ExperimentConfig:
    base = args.out or args.resume
    folder = str(pathlib.Path(base, *v.parts)) if base else None
    if args.config is None:
        if not args.resume:
            raise ConfigError("give a CONFIG (preset name or .py file), or --resume DIR")
        source = folder if _has_checkpoint_in(folder) else _resume_source(args, variants)
        cfg = override(_saved_config(source), parse_overrides(v.sets))
    else:
        cfg = load_config(args.config, v.sets)
    if folder:
        cfg = override(cfg, {"run.out_dir": folder})
    if args.checkpoint_every is not None:
        cfg = override(cfg, {"run.checkpoint_every": args.checkpoint_every})
    if v.parts:
        cfg = dataclasses.replace(cfg, name=f"{cfg.name}[{','.join(v.parts)}]")
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


def _has_checkpoint_in(folder: str | None) -> bool:
    from marsjax import checkpoint

    if not folder or not pathlib.Path(folder).is_dir():
        return False
    return checkpoint.latest_round(folder) is not None


def _has_checkpoint(c: ExperimentConfig) -> bool:
    return _has_checkpoint_in(c.run.out_dir)


def _held_run_files(folder: pathlib.Path) -> list[str]:
    held = [n for n in RUN_FILES if (folder / n).exists()]
    if (folder / "checkpoints").exists():
        held.append("checkpoints/")
    return held


def _clear_run_files(folder: pathlib.Path) -> None:
    import shutil

    for n in RUN_FILES:
        (folder / n).unlink(missing_ok=True)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)


def _prepare_out(folder: str, *, overwrite: bool, resuming: bool, top: str) -> None:
    """Refuses a results folder that holds another run (unless ``overwrite``, which clears what
    a run writes there, or a resume), and checks that the folder can be created and written,
    before anything compiles."""
    import tempfile

    p = pathlib.Path(folder)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"run.out_dir={folder!r}: it is a file, not a folder")
    held = _held_run_files(p) if p.is_dir() else []
    if held and not resuming:
        if not overwrite:
            raise ConfigError(
                f"run.out_dir={folder!r} already holds a run ({', '.join(held)}): pass "
                f"--overwrite to start it afresh, --resume {top} to continue it, or another --out"
            )
        _clear_run_files(p)
    elif held and resuming and not _has_checkpoint_in(folder):
        if not overwrite:
            raise ConfigError(
                f"run.out_dir={folder!r} holds a run without checkpoints ({', '.join(held)}): "
                "nothing to resume there; pass --overwrite to start it afresh"
            )
        _clear_run_files(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise ConfigError(
            f"run.out_dir={folder!r}: cannot write the results folder there: "
            f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
        ) from None


def _start_distributed(args) -> None:
    """``--distributed``: join the multi-process runtime before anything touches JAX."""
    from marsjax import sharding

    sharding.initialize(args.coordinator, args.num_processes, args.process_id)
    import jax

    if jax.process_index() != 0:  # one process writes files and draws the progress bar
        args.quiet = True
        args.out = None
        args.tensorboard = None


def _cmd_run(args) -> int:
    if args.distributed:
        if args.checkpoint_every or args.resume:
            raise ConfigError(
                "--distributed with checkpoints is not supported yet (multi-process "
                "checkpointing is untested); drop --checkpoint-every/--resume"
            )
        _start_distributed(args)
    if args.resume and args.out and args.out != args.resume:
        raise ConfigError("--out and --resume name different folders; --resume DIR writes to DIR")
    if args.overwrite and not (args.out or args.resume):
        raise ConfigError("--overwrite needs a results folder (--out DIR)")
    variants = _variants(args)
    cfgs = []
    for v in variants:
        c = _variant_config(args, v, variants)
        if args.distributed:
            import jax

            if jax.process_index() != 0:
                c = override(c, {"run.out_dir": None})
        validate(c)  # every variant is checked before the first one compiles
        _check_checkpointing(c)
        cfgs.append(c)
    from marsjax import simulation

    resume = [bool(args.resume) and _has_checkpoint(c) for c in cfgs]
    if args.resume and not any(resume):
        raise _nothing_to_resume(args.resume)
    top = args.out or args.resume
    for c, res_c in zip(cfgs, resume):
        if c.run.out_dir:
            _prepare_out(c.run.out_dir, overwrite=args.overwrite, resuming=res_c, top=top)
    if top and any(v.parts for v in variants) and args.overwrite:
        _clear_run_files(pathlib.Path(top))
    summaries = []
    dataset = None
    for v, c, res_c in zip(variants, cfgs, resume):
        if args.resume and not res_c:
            print(f"{c.name}: no checkpoint in {c.run.out_dir}, starting it", file=sys.stderr)

        def on_resume(rnd, skipped, c=c):
            text = f"{c.name}: resuming {c.run.out_dir} from its checkpoint of round {rnd}"
            if skipped:
                text += "; skipped the unreadable " + "; ".join(
                    f"checkpoint of round {r} ({why})" for r, why in skipped
                )
            print(text, file=sys.stderr, flush=True)

        tb = str(pathlib.Path(args.tensorboard, *v.parts)) if args.tensorboard else None
        res = simulation.run_resumable(
            c,
            resume=res_c,
            dataset=dataset,
            progress=not args.quiet,
            keep=args.keep_checkpoints,
            tensorboard=tb,
            on_resume=on_resume,
        )
        dataset = res["sim"].dataset
        summaries.append(res["summary"])
    cfg = cfgs[0]
    from marsjax.metrics import CAD_RULE

    print(
        f"\n{cfg.name.split('[')[0]}: {cfg.data.name}, {cfg.model.name}, attack={cfg.attack.name}, "
        f"{cfg.run.rounds} rounds, {cfg.run.clients_per_round} clients/round"
    )
    _print_table(summaries)
    if args.seeds is not None and len({s["seed"] for s in summaries}) > 1:
        _print_seeds(summaries, top if cfg.run.out_dir else None)
    print(f"ACC/ASR: last round; TPR/FPR: mean over attack rounds; {CAD_RULE} (all %).")
    if top and cfg.run.out_dir:
        print(f"results: {top}")
    if args.tensorboard:
        print(f"tensorboard: {args.tensorboard}  (tensorboard --logdir {args.tensorboard})")
    return 0


def _print_seeds(summaries: list[dict], out: str | None) -> None:
    """Mean ± std over the seeds of each defense; written to ``out/summary_seeds.{json,md}``."""
    from marsjax.report import seeds_markdown, seeds_summary

    by: dict[str, list[dict]] = {}
    for s in summaries:
        by.setdefault(s["defense"], []).append(s)
    groups = [seeds_summary(group) for group in by.values()]
    text = seeds_markdown(groups)
    print(f"\nmean ± std over seeds {','.join(str(x) for x in groups[0]['seeds'])}:\n")
    print(text, end="")
    if out:
        p = pathlib.Path(out)
        (p / "summary_seeds.json").write_text(json.dumps(groups, indent=2) + "\n")
        (p / "summary_seeds.md").write_text(text)


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
        for r, why in meta.get("skipped", []):
            print(
                f"marsjax: warning: checkpoint of round {r} is unreadable ({why})", file=sys.stderr
            )
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
        raise factory_error(e) or TraceError(f"does not build: {type(e).__name__}: {e}") from e
    try:
        jax.eval_shape(sim.round_step, state, sim.data)
        if cfg.run.rounds_per_call > 1:
            jax.eval_shape(sim.multi_round_step, state, sim.data)
        jax.eval_shape(
            sim.evaluate, state.global_variables, state.attack_state, sim.x_test, sim.y_test
        )
    except Exception as e:
        raise TraceError(f"its round does not trace: {type(e).__name__}: {e}") from e


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


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("marsjax")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown (not installed)"


def _registries_text() -> str:
    """The attacks and defenses a run can name (``marsjax run --help``)."""
    import textwrap

    from marsjax import attacks, defenses

    def listing(title, names):
        return textwrap.fill(
            f"{title}: " + ", ".join(names),
            width=98,
            subsequent_indent="  ",
        )

    return "\n".join(
        [
            listing(
                "attacks (--set attack.name=NAME)",
                [n for n in attacks.REGISTRY if not n.startswith("_")],
            ),
            listing(
                "defenses (--set defense.name=NAME or --defenses A,B)",
                [n for n in defenses.REGISTRY if not n.startswith("_")],
            ),
            textwrap.fill(
                "options: --set attack.options.KEY=VALUE / defense.options.KEY=VALUE; a changed "
                "name starts from the new one's defaults (on a preset: the preset's own options "
                "for it).",
                width=98,
                subsequent_indent="  ",
            ),
            "presets: " + ", ".join(sorted(PRESETS)) + " (marsjax presets)",
        ]
    )


class _Parser(argparse.ArgumentParser):
    """An argument parser whose epilog may be computed when help is shown (``epilog_fn``), so
    that listing the registries costs nothing unless ``--help`` is asked for."""

    def __init__(self, *args, epilog_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._epilog_fn = epilog_fn

    def format_help(self) -> str:
        if self._epilog_fn is not None:
            self.epilog = self._epilog_fn()
        return super().format_help()


_DESCRIPTION = (
    "marsjax: federated learning under backdoor attack, in JAX (MARS and the baselines). "
    "Run 'marsjax COMMAND --help' for a command's options."
)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="marsjax", description=_DESCRIPTION)
    p.add_argument("--version", action="version", version=f"marsjax {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

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

    sp = sub.add_parser(
        "run",
        help="run an experiment",
        description="Run an experiment: a preset or a config file, changed by --set.",
        epilog_fn=_registries_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(sp, optional=True)
    sp.add_argument(
        "--defenses",
        metavar="A,B",
        help="comma-separated defenses to run the same config with (each one as --set "
        "defense.name=NAME would; results in DIR/<defense>)",
    )
    sp.add_argument(
        "--seeds",
        metavar="S,S",
        help="run once per seed (run.seed), e.g. 0,1,2; with several, results in DIR/s<seed> and "
        "the mean ± std over the seeds in DIR/summary_seeds.md",
    )
    sp.add_argument("--out", metavar="DIR", help="results folder (overrides run.out_dir)")
    sp.add_argument(
        "--overwrite",
        action="store_true",
        help="start the results folder afresh if it holds a run (default: refuse)",
    )
    sp.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="also write TensorBoard event files (every round's metrics) to DIR "
        "(needs tensorboardX: pip install 'marsjax[tensorboard]')",
    )
    sp.add_argument(
        "--quiet", action="store_true", help="no progress (bar on a terminal, else log lines)"
    )
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
    """Runs the ``marsjax`` command; returns the exit status (2: bad config, data, checkpoint or
    path, said in one line; 1: the output pipe closed early).

    Args:
      argv: the arguments (default ``sys.argv[1:]``).
    """
    args = build_parser().parse_args(argv)
    return run_command(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
