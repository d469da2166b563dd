"""Grids of experiments run as one command: attacks x defenses (x seeds, x a hyper-parameter).

A sweep is a :class:`Sweep`: a base :class:`~marsjax.config.ExperimentConfig` and named axes. A
sweep file (``experiments/configs/table2_*.py``) defines ``get_sweep()`` returning one;
``marsjax sweep FILE`` runs every point of the grid (:func:`run_sweep`), then writes the
paper-style tables and plots (:func:`write_outputs`)::

    out_dir/
      sweep.json          the grid: axes, labels, seeds, and every run's folder (relative)
      table.md            paper layout: a row per defense (x the other axes), a column per attack,
                          cells ACC/ASR/TPR/FPR/CAD (means over seeds), plus one row per run
      table.csv           one row per run: axis labels, seed, acc, asr, tpr, fpr, cad, ...
      heatmap_cad.png     CAD over rows x columns
      curves_<col>.png    ACC and ASR against the round, one line per row, a file per column
      runs/<id>/          one run each: config.json, metrics.jsonl, summary.json, summary.md,
                          curves.png (what ``marsjax run --out`` writes)
      pretrain/ ...       (when the sweep pretrains its clean start there)

**Axes.** ``axes`` maps an axis name to its values, in order. A dotted config path
(``"defense.name"``, ``"defense.options.epsilon"``, ``"data.dirichlet_alpha"``) takes a list of
values. Any name takes a mapping ``{label: {dotted path: value, ...}}`` for points that change
several fields together (the attacker ratio changes ``attack.num_attackers`` and
``attack.attackers_per_round``). Choosing ``attack.name`` / ``defense.name`` also replaces the
section's options by ``attack_options[name]`` / ``defense_options[name]`` (default ``{}``), so a
grid never carries one defense's options into another; the other axes apply after that.

**Resuming.** A run whose folder holds ``summary.json`` written for the same config is skipped;
a run interrupted after a checkpoint (``checkpoint_every``) resumes from it
(:func:`marsjax.checkpoint.run_resumable`); any other run starts over. A finished run whose
config changed is refused (naming the fields) unless ``redo_changed``. A run that fails is
recorded in its ``error.txt`` and the sweep goes on.

**Running variants together.** With ``batch_axis`` set, the points that differ only along that
axis run as ONE compiled program: the round maps ``sim.round_step`` over their stacked states
(``lax.map``; e.g. MARS's ``MarsState.epsilon`` differs), sharing the round counter, the data
and (when equal) the root key. This is only done when the variants are the same computation on
different values: their datasets and partitions must be equal and their traced rounds identical
(same jaxpr, same constants), i.e. the axis changes only values held in the state; otherwise the
points run one by one (and the log says why). Each variant then runs, one after the other inside
the program, the very round of its single run, so it takes the same decisions (sampled clients,
accepted sets, 3DFed's indicators) and gets the same numbers as ``marsjax run`` of its config
(bit for bit on CPU; ``tests/test_sweep.py`` checks it under 3DFed).

The variants are deliberately not ``vmap``-ed (as they were before): batching them batches the
convolutions, whose float rounding differs from a single run's (~1e-7 after two local steps), and
discrete choices follow the rounding. 3DFed puts its indicators on the smallest entries of an
update (``top_k`` over tiny values): on Fashion-MNIST at CPU scale (Table 8's config) the vmapped
runs chose other positions, and MARS accepted other clients, from the first round on (measured
from a random start); the Table 8 cell epsilon 0.1 x 3DFed had TPR 77.08 batched (committed),
83.33 run alone.

What batching saves is the compilation (one instead of one per variant; the data is shared), not
run time: the variants run in sequence, as separate runs would. Measured on 2 CPU cores: four
epsilon values of the test's digits federation under 3DFed (3 rounds), ``run_sweep`` 27 s batched
vs 55 s one by one (compile-bound); two epsilon values of Table 8's Fashion-MNIST config, 3
rounds: one compile of 12.5 s vs 2 x 17 s, and 32 s vs 36 s of rounds (``vmap`` took 28 s to
compile and 45 s to run). On an accelerator ``vmap`` could run the variants in parallel; its
results would not be those of single runs. A batched group has no checkpoints: if it is
interrupted, it reruns.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from marsjax.config import (
    ConfigError,
    ExperimentConfig,
    override,
    parse_overrides,
    to_dict,
    validate,
)
from marsjax.pretrain import PretrainSpec

__all__ = [
    "SWEEP_FILE",
    "MixedCommitsError",
    "PretrainSpec",
    "Sweep",
    "SweepRun",
    "check_commits",
    "collect",
    "commit_label",
    "commits_table",
    "expand",
    "load_sweep",
    "plot_heatmap",
    "plot_sweep_curves",
    "project_root",
    "run_sweep",
    "select",
    "wide_table",
    "write_outputs",
]

SWEEP_FILE = "sweep.json"
_NAME_AXES = ("attack.name", "defense.name")
COLUMNS = ("acc", "asr", "tpr", "fpr", "cad")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A grid of experiments.

    Attributes:
      name: the sweep's name (titles, run names).
      base: the config every point starts from.
      axes: axis name -> values (see the module docstring); the grid is their product, in order.
      seeds: ``run.seed`` of every point (each point runs once per seed).
      out_dir: results folder (relative paths are relative to the working directory).
      cols: the axis whose labels are the wide table's columns (default ``attack.name`` when it is
        an axis, else the last axis); the other axes make the rows.
      attack_options: attack name -> its ``attack.options`` when ``attack.name`` is chosen.
      defense_options: defense name -> its ``defense.options`` when ``defense.name`` is chosen.
      no_detection: defenses without detection decisions (the paper's FedCLP): their TPR/FPR are
        not reported and CAD is ``(ACC + 100 - ASR) / 2``.
      batch_axis: run the points along this axis together in one compiled program, one after
        the other (when they are the same program on different state values); same results as
        separate runs, one compilation instead of one each.
      pretrain: pretrain the clean start first (if missing) and start every run from it.
      checkpoint_every: checkpoint every run every this many rounds (0: never).
      description: free text for ``table.md``.
    """

    name: str
    base: ExperimentConfig
    axes: Mapping[str, Sequence[Any] | Mapping[str, Mapping[str, Any]]]
    seeds: Sequence[int] | None = None
    out_dir: str | None = None
    cols: str | None = None
    attack_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    defense_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    no_detection: Sequence[str] = ("fedclp",)
    batch_axis: str | None = None
    pretrain: PretrainSpec | None = None
    checkpoint_every: int = 0
    description: str = ""

    def __post_init__(self):
        if not self.axes:
            raise ConfigError(f"sweep {self.name!r}: axes must name at least one axis")
        for axis, values in self.axes.items():
            if isinstance(values, Mapping):
                for label, changes in values.items():
                    if not isinstance(changes, Mapping):
                        raise ConfigError(
                            f"sweep axis {axis!r}: value {label!r} must map dotted fields to "
                            f"values, got {changes!r}"
                        )
            elif "." not in axis:
                raise ConfigError(
                    f"sweep axis {axis!r}: a list of values needs a dotted config path as the "
                    "axis name (e.g. 'defense.name'); or give {label: {path: value}}"
                )
            if len(values) == 0:
                raise ConfigError(f"sweep axis {axis!r} has no values")
        if self.cols is not None and self.cols not in self.axes:
            raise ConfigError(f"sweep cols={self.cols!r} is not an axis: {list(self.axes)}")
        if self.batch_axis is not None and self.batch_axis not in self.axes:
            raise ConfigError(f"sweep batch_axis={self.batch_axis!r} is not an axis")

    @property
    def col_axis(self) -> str:
        if self.cols is not None:
            return self.cols
        return "attack.name" if "attack.name" in self.axes else list(self.axes)[-1]

    @property
    def row_axes(self) -> list[str]:
        return [a for a in self.axes if a != self.col_axis]

    @property
    def results_dir(self) -> pathlib.Path:
        return pathlib.Path(self.out_dir or f"experiments/results/{self.name}")

    @property
    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else [self.base.run.seed]


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One point of the grid, for one seed.

    Attributes:
      id: folder name under ``runs/`` (labels joined by ``__``, then ``s<seed>``).
      labels: axis -> the label of this point's value.
      seed: ``run.seed``.
      config: the full config (``run.out_dir`` = the run's folder).
    """

    id: str
    labels: dict[str, str]
    seed: int
    config: ExperimentConfig

    @property
    def out_dir(self) -> pathlib.Path:
        return pathlib.Path(self.config.run.out_dir)


def _label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)


def _axis_points(axis: str, values) -> list[tuple[str, dict[str, Any]]]:
    """``[(label, {dotted path: value})]`` of one axis."""
    if isinstance(values, Mapping):
        return [(str(label), dict(changes)) for label, changes in values.items()]
    return [(_label(v), {axis: v}) for v in values]


def _short(axis: str) -> str:
    """``defense.name`` -> ``defense``, ``defense.options.epsilon`` -> ``epsilon``."""
    if axis in _NAME_AXES:
        return axis.split(".")[0]
    return axis.rsplit(".", 1)[-1]


def _apply(sweep: Sweep, cfg: ExperimentConfig, changes: Mapping[str, Any]) -> ExperimentConfig:
    """Applies one point's changes: names first (resetting their section's options), then the
    rest (so an option axis lands on the chosen attack or defense)."""
    named = {k: v for k, v in changes.items() if k in _NAME_AXES}
    rest = {k: v for k, v in changes.items() if k not in _NAME_AXES}
    for path, name in named.items():
        section = path.split(".")[0]
        table = sweep.attack_options if section == "attack" else sweep.defense_options
        cfg = override(cfg, {path: name, f"{section}.options": dict(table.get(name, {}))})
    return override(cfg, rest) if rest else cfg


def expand(sweep: Sweep, pretrained: str | None = None) -> list[SweepRun]:
    """Every point of the grid, for every seed, as a validated :class:`SweepRun`.

    Args:
      sweep: the sweep.
      pretrained: ``run.init_checkpoint`` of every run (the clean start), if any.

    Raises:
      ConfigError: a point's config is invalid (the message names the run and the field).
    """
    axes = list(sweep.axes)
    points = [_axis_points(a, sweep.axes[a]) for a in axes]
    out = sweep.results_dir / "runs"
    runs = []
    for combo in itertools.product(*points):
        labels = {a: label for a, (label, _) in zip(axes, combo)}
        changes: dict[str, Any] = {}
        for _, ch in combo:
            changes.update(ch)
        parts = [
            labels[a]
            if a in _NAME_AXES or isinstance(sweep.axes[a], Mapping)
            else f"{_short(a)}={labels[a]}"
            for a in axes
        ]
        for seed in sweep.seed_list:
            rid = _safe("__".join([*parts, f"s{seed}"]))
            try:
                cfg = _apply(sweep, sweep.base, changes)
                run_changes: dict[str, Any] = {
                    "name": f"{sweep.name}[{rid}]",
                    "run.seed": seed,
                    "run.out_dir": (out / rid).as_posix(),
                }
                if sweep.checkpoint_every:
                    run_changes["run.checkpoint_every"] = sweep.checkpoint_every
                if pretrained is not None:
                    run_changes["run.init_checkpoint"] = pretrained
                cfg = validate(override(cfg, run_changes))
            except ConfigError as e:
                raise ConfigError(f"sweep {sweep.name!r}, run {rid}: {e}") from e
            runs.append(SweepRun(rid, labels, seed, cfg))
    ids = [r.id for r in runs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"sweep {sweep.name!r}: two points have the same labels: {ids}")
    return runs


def select(
    sweep: Sweep, runs: Sequence[SweepRun], only: Mapping[str, Sequence[str]] | None
) -> list[SweepRun]:
    """The runs whose labels are among ``only[axis]`` for every axis of ``only`` (``seed`` is
    an axis too); all of them when ``only`` is empty.

    Raises:
      ConfigError: an axis that the sweep does not have, or a label that its axis does not
        have (with the closest one, ignoring case, as a suggestion).
    """
    from marsjax.config import _suggest

    selected = list(runs)
    for axis, labels in (only or {}).items():
        if axis == "seed":
            known = [str(x) for x in sweep.seed_list]
        elif axis in sweep.axes:
            known = [label for label, _ in _axis_points(axis, sweep.axes[axis])]
        else:
            axes = [*sweep.axes, "seed"]
            hint = _suggest(axis, axes)
            raise ConfigError(
                f"--only {axis}: not an axis of sweep {sweep.name!r} (axes: {', '.join(axes)})"
                + (f"; did you mean {hint}?" if hint else "")
            )
        for label in labels:
            if str(label) not in known:
                hint = _suggest(label, known)
                raise ConfigError(
                    f"--only {axis}={label}: no such label (labels of {axis}: "
                    f"{', '.join(known)})" + (f"; did you mean {axis}={hint}?" if hint else "")
                )
        keep = {str(x) for x in labels}
        selected = [
            r for r in selected if (str(r.seed) if axis == "seed" else r.labels[axis]) in keep
        ]
    return selected


def project_root(path: str | os.PathLike) -> pathlib.Path:
    """The folder that the relative paths of the sweep file ``path`` are relative to: the nearest
    folder above the file holding ``pyproject.toml`` or ``.git`` (the repository root for the
    files in ``experiments/configs``), else the file's own folder. ``marsjax sweep`` and
    ``marsjax plot`` resolve a sweep's results folder from there, wherever they are run."""
    here = pathlib.Path(path).resolve().parent
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file() or (folder / ".git").exists():
            return folder
    return here


def load_sweep(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Sweep:
    """The :class:`Sweep` of a Python file defining ``get_sweep()``; ``overrides``
    (``section.field=value``) change its base config (``data.data_dir=...``)."""
    from marsjax.config import call_file_function

    path = pathlib.Path(path)
    if not path.exists():
        raise ConfigError(f"sweep file {str(path)!r} not found")
    sweep = call_file_function(path, "get_sweep")
    if not isinstance(sweep, Sweep):
        raise ConfigError(f"{path}: get_sweep() must return a marsjax.sweep.Sweep")
    if overrides:
        sweep = dataclasses.replace(sweep, base=override(sweep.base, parse_overrides(overrides)))
    return sweep


# ------------------------------------------------------------------------------------------------
# Running


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _differs(run: SweepRun) -> list[str]:
    """Result-affecting fields where the run folder's config.json differs from the run's config."""
    from marsjax.checkpoint import BOOKKEEPING_FIELDS, EXECUTION_FIELDS, config_diff

    saved = _read_json(run.out_dir / "config.json")
    if saved is None:
        return ["config.json (unreadable)"]
    current = json.loads(json.dumps(to_dict(run.config)))
    return [
        f for f in config_diff(saved, current) if f not in BOOKKEEPING_FIELDS | EXECUTION_FIELDS
    ]


def status(run: SweepRun) -> str:
    """``done``, ``changed`` (done for another config), ``partial`` (has a checkpoint),
    ``failed`` (``error.txt``) or ``todo``."""
    from marsjax import checkpoint

    out = run.out_dir
    if (out / "summary.json").exists():
        return "changed" if _differs(run) else "done"
    if (out / checkpoint.CHECKPOINT_SUBDIR).is_dir() and checkpoint.latest_round(out) is not None:
        return "partial"
    if (out / "error.txt").exists():
        return "failed"
    return "todo"


def _clear(out: pathlib.Path) -> None:
    """Removes what a run writes (a fresh start must not append to an old metrics.jsonl)."""
    for name in (
        "metrics.jsonl",
        "metrics.csv",
        "summary.json",
        "summary.md",
        "curves.png",
        "error.txt",
        "plot_error.txt",
        "config.json",
    ):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


class _Datasets:
    """Loads each distinct dataset once."""

    def __init__(self, preloaded: Any = None):
        self._cache: dict = {}
        self._preloaded = preloaded

    def get(self, cfg: ExperimentConfig):
        if self._preloaded is not None:
            return self._preloaded
        from marsjax.data import load_dataset

        d = cfg.data
        key = (d.name, d.data_dir, d.source)
        if key not in self._cache:
            self._cache[key] = load_dataset(d.name, d.data_dir, d.source)
        return self._cache[key]


def _stack(trees: Sequence[Any]) -> Any:
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _to_record(metrics: dict, index: int) -> dict:
    rec = {}
    for k, v in metrics.items():
        v = np.asarray(v)[index]
        if v.ndim == 0:
            x = v.item()
            rec[k] = None if isinstance(x, float) and not math.isfinite(x) else x
        else:
            rec[k] = [
                None if isinstance(e, float) and not math.isfinite(e) else e for e in v.tolist()
            ]
    return rec


def _jaxpr_key(sim, state) -> tuple[str, list]:
    import jax

    closed = jax.make_jaxpr(sim.round_step)(state, sim.data)
    return str(closed.jaxpr), [np.asarray(c) for c in closed.consts]


def _batchable(sims: Sequence[Any], states: Sequence[Any]) -> str | None:
    """Why the variants cannot run as one program (``None``: they can)."""
    import jax

    d0 = jax.tree.leaves(sims[0].data)
    for s in sims[1:]:
        d = jax.tree.leaves(s.data)
        if len(d) != len(d0) or any(
            a.shape != b.shape or not np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(d0, d)
        ):
            return "their training data or partitions differ"
    t0 = jax.tree.structure(states[0])
    shapes0 = [(x.shape, x.dtype) for x in jax.tree.leaves(states[0])]
    for st in states[1:]:
        if jax.tree.structure(st) != t0 or [(x.shape, x.dtype) for x in jax.tree.leaves(st)] != (
            shapes0
        ):
            return "their states have different structures or shapes"
    if not np.array_equal(
        np.asarray(states[0].round), np.asarray(states[-1].round)
    ):  # pragma: no cover - fresh states all start at 0
        return "they start at different rounds"
    text0, consts0 = _jaxpr_key(sims[0], states[0])
    for sim, st in zip(sims[1:], states[1:]):
        text, consts = _jaxpr_key(sim, st)
        if text != text0 or len(consts) != len(consts0):
            return "their compiled rounds differ (the axis changes the program, not only state)"
        if any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(consts, consts0)):
            return "their compiled rounds close over different constants"
    return None


def _finish_run(cfg: ExperimentConfig, records: list[dict], wall_s: float) -> dict:
    """Writes summary.json, summary.md and curves.png of a run as simulation.run does."""
    from marsjax import report, run_logs
    from marsjax.defenses import NO_DETECTION
    from marsjax.metrics import summarize

    out = pathlib.Path(cfg.run.out_dir)
    run_logs.write_csv(out / "metrics.csv", records)
    summary = summarize(
        records,
        attack_active=cfg.attack.name != "none",
        detects=cfg.defense.name not in NO_DETECTION,
    )
    summary.update(
        name=cfg.name,
        attack=cfg.attack.name,
        defense=cfg.defense.name,
        rounds=len(records),
        wall_s=wall_s,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(report.summary_markdown([summary]))
    try:
        report.plot_curves(records, out / "curves.png", title=report.curves_title(cfg))
    except Exception as e:  # noqa: BLE001 (plotting must never lose a finished run)
        (out / "plot_error.txt").write_text(f"{type(e).__name__}: {e}\n")
    return summary


def run_batched(
    runs: Sequence[SweepRun], dataset: Any, *, sims: Sequence[Any] | None = None, log=print
) -> list[dict] | None:
    """Runs ``runs`` (one grid line along the batch axis) as one compiled program.

    Returns their summaries, or ``None`` when they cannot be batched exactly (the reason is
    logged) and must run one by one.
    """
    import jax

    from marsjax import simulation
    from marsjax.simulation import RoundState

    sims = list(sims) if sims is not None else [simulation.build(r.config, dataset) for r in runs]
    if any(s.mesh is not None for s in sims):
        log("  not batched: the client axis is sharded over several devices")
        return None
    states = [s.init_state() for s in sims]
    why = _batchable(sims, states)
    if why is not None:
        log(f"  not batched: {why}")
        return None
    sim0 = sims[0]
    keys = [jax.random.key_data(s.key) for s in states]
    shared_key = all(np.array_equal(np.asarray(keys[0]), np.asarray(k)) for k in keys[1:])
    rest = _stack([tuple(s[2:]) for s in states])
    key = states[0].key if shared_key else _stack([s.key for s in states])
    rnd = states[0].round

    # The variants run one after the other inside the program (``lax.map``), each through the
    # very round of a single run. Not ``vmap``: batching the variants batches the convolutions,
    # whose float rounding then differs from a single run's, and discrete choices such as 3DFed's
    # indicator positions (the smallest entries of an update) follow it (module docstring).
    def step(rnd, key, rest, data):
        def one(xs):
            k, r = (key, xs) if shared_key else xs
            new, metrics = sim0.round_step(RoundState(rnd, k, *r), data)
            return tuple(new[2:]), metrics

        new_rest, metrics = jax.lax.map(one, rest if shared_key else (key, rest))
        return rnd + 1, new_rest, metrics

    def evaluate_all(variables, attack_state, x, y):
        return jax.lax.map(lambda v: sim0.evaluate(*v, x, y), (variables, attack_state))

    step = jax.jit(step, donate_argnums=(2,))
    evaluate = jax.jit(evaluate_all)
    cfgs = [r.config for r in runs]
    r0 = cfgs[0].run
    for r in runs:
        r.out_dir.mkdir(parents=True, exist_ok=True)
        _clear(r.out_dir)
        (r.out_dir / "config.json").write_text(json.dumps(to_dict(r.config), indent=2) + "\n")
    records: list[list[dict]] = [[] for _ in runs]
    t0 = time.perf_counter()
    n = len(runs)
    while int(rnd) < r0.rounds:
        rnd, rest, metrics = step(rnd, key, rest, sim0.data)
        done = int(rnd)
        host = jax.tree.map(np.asarray, metrics)  # every leaf has the variant axis first
        new = [_to_record(host, i) for i in range(n)]
        if done % r0.eval_every == 0 or done == r0.rounds:
            gv, attack_state = rest[0], rest[3]
            ev = evaluate(gv, attack_state, sim0.x_test, sim0.y_test)
            ev = {k: np.asarray(v) for k, v in ev.items()}
            for i in range(n):
                new[i].update({k: float(v[i]) for k, v in ev.items()})
        elapsed = time.perf_counter() - t0
        for i, r in enumerate(runs):
            new[i]["elapsed_s"] = elapsed
            records[i].append(new[i])
            with open(r.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(new[i]) + "\n")
        last = new[0]
        if "acc" in last:
            accs = " ".join(f"{rec['acc']:.1f}/{rec['asr']:.1f}" for rec in new)
            log(f"  round {done}/{r0.rounds} ACC/ASR {accs} ({elapsed:.0f}s)")
    wall = time.perf_counter() - t0
    return [_finish_run(c, recs, wall) for c, recs in zip(cfgs, records)]


def _run_one(run: SweepRun, dataset: Any, progress: bool) -> dict:
    from marsjax import checkpoint

    st = status(run)
    if st != "partial":
        _clear(run.out_dir)
    res = checkpoint.run_resumable(
        run.config, resume=st == "partial", dataset=dataset, progress=progress
    )
    return res["summary"]


@dataclasses.dataclass
class SweepResult:
    """What :func:`run_sweep` did: run ids per outcome, and the outputs written."""

    ran: list[str]
    skipped: list[str]
    failed: dict[str, str]
    batched: list[list[str]]
    outputs: dict[str, str]


def run_sweep(
    sweep: Sweep,
    *,
    only: Mapping[str, Sequence[str]] | None = None,
    dataset: Any = None,
    progress: bool = False,
    redo_changed: bool = False,
    log: Callable[[str], None] | None = None,
    allow_mixed_commits: bool = False,
) -> SweepResult:
    """Runs every point of ``sweep`` that is not done yet, then writes its tables and plots.

    Args:
      sweep: the sweep.
      only: axis -> labels: run only the points with those labels (the tables still show every
        finished run).
      dataset: a preloaded dataset for every run (tests); default: loaded from the configs.
      progress: a progress bar per run.
      redo_changed: rerun finished runs whose config changed (default: refuse, naming them).
      log: where progress lines go (default: stderr).
      allow_mixed_commits: write the tables even when the finished runs were made by different
        code (each cell then names its commits); otherwise that raises
        :class:`MixedCommitsError` after the runs (their folders are complete either way).

    Returns:
      A :class:`SweepResult`.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = sweep.results_dir
    pretrained = None
    if sweep.pretrain is not None:
        from marsjax import pretrain as pretrain_lib

        spec = sweep.pretrain
        log(f"{sweep.name}: clean start in {spec.out_dir}")
        datasets = _Datasets(dataset)
        res = pretrain_lib.pretrain(
            sweep.base,
            spec.out_dir,
            target_acc=spec.target_acc,
            max_rounds=spec.max_rounds,
            eval_every=spec.eval_every,
            dataset=datasets.get(sweep.base),
            progress=progress,
        )
        how = "found" if res.skipped else f"trained in {res.wall_s:.0f}s"
        log(f"  {how}: round {res.rounds}, ACC {res.acc:.2f}, ASR {res.asr:.2f}")
        pretrained = spec.out_dir
    runs = expand(sweep, pretrained)
    selected = select(sweep, runs, only)
    _write_index(sweep, runs)
    states = {r.id: status(r) for r in selected}
    changed = [r for r in selected if states[r.id] == "changed"]
    if changed and not redo_changed:
        details = "; ".join(f"{r.id}: {', '.join(_differs(r))}" for r in changed)
        raise ConfigError(
            f"finished runs were made with another config ({details}); rerun them with "
            "--redo-changed, or use another out_dir"
        )
    todo = [r for r in selected if states[r.id] != "done"]
    skipped = [r.id for r in selected if states[r.id] == "done"]
    log(f"{sweep.name}: {len(selected)} runs, {len(skipped)} done, {len(todo)} to run in {out}")
    datasets = _Datasets(dataset)
    result = SweepResult(ran=[], skipped=skipped, failed={}, batched=[], outputs={})

    groups: list[list[SweepRun]] = []
    if sweep.batch_axis is not None:
        by_rest: dict[tuple, list[SweepRun]] = {}
        for r in todo:
            k = (r.seed, *(r.labels[a] for a in sweep.axes if a != sweep.batch_axis))
            by_rest.setdefault(k, []).append(r)
        groups = list(by_rest.values())
    else:
        groups = [[r] for r in todo]

    t_start = time.perf_counter()
    for gi, group in enumerate(groups):
        ds = datasets.get(group[0].config)
        t0 = time.perf_counter()
        if len(group) > 1:
            log(f"[{gi + 1}/{len(groups)}] {len(group)} runs together: {[r.id for r in group]}")
            try:
                summaries = run_batched(group, ds, log=log)
            except Exception as e:  # noqa: BLE001 (one failing group must not stop the sweep)
                for r in group:
                    _record_failure(r, e, result)
                log(f"  FAILED: {type(e).__name__}: {e}")
                continue
            if summaries is not None:
                result.batched.append([r.id for r in group])
                for r, s in zip(group, summaries):
                    result.ran.append(r.id)
                    log(f"  {r.id}: {_fmt_summary(s)}")
                log(f"  {time.perf_counter() - t0:.0f}s")
                continue
        for r in group:
            log(f"[{gi + 1}/{len(groups)}] {r.id} ({status(r)})")
            t1 = time.perf_counter()
            try:
                s = _run_one(r, ds, progress)
            except Exception as e:  # noqa: BLE001
                _record_failure(r, e, result)
                log(f"  FAILED: {type(e).__name__}: {e}")
                continue
            result.ran.append(r.id)
            log(f"  {_fmt_summary(s)} ({time.perf_counter() - t1:.0f}s)")
    log(f"{sweep.name}: ran {len(result.ran)} in {time.perf_counter() - t_start:.0f}s")
    result.outputs = write_outputs(out, allow_mixed_commits=allow_mixed_commits)
    return result


def _record_failure(run: SweepRun, e: BaseException, result: SweepResult) -> None:
    run.out_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    (run.out_dir / "error.txt").write_text(text)
    result.failed[run.id] = f"{type(e).__name__}: {e}"


def _fmt_summary(s: Mapping[str, Any]) -> str:
    return " ".join(f"{k.upper()} {_num(s.get(k))}" for k in COLUMNS)


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.2f}"


def _write_index(sweep: Sweep, runs: Sequence[SweepRun]) -> None:
    out = sweep.results_dir
    out.mkdir(parents=True, exist_ok=True)
    index = {
        "name": sweep.name,
        "description": sweep.description,
        "axes": {a: [label for label, _ in _axis_points(a, v)] for a, v in sweep.axes.items()},
        "cols": sweep.col_axis,
        "rows": sweep.row_axes,
        "seeds": sweep.seed_list,
        "no_detection": list(sweep.no_detection),
        "batch_axis": sweep.batch_axis,
        "pretrain": dataclasses.asdict(sweep.pretrain) if sweep.pretrain else None,
        "runs": [
            {
                "id": r.id,
                "labels": r.labels,
                "seed": r.seed,
                "dir": r.out_dir.relative_to(out).as_posix(),
                "attack": r.config.attack.name,
                "defense": r.config.defense.name,
            }
            for r in runs
        ],
    }
    (out / SWEEP_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Tables and plots


def collect(out_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    """The sweep index and one row per run of a sweep's results folder.

    Each row: ``id``, ``labels``, ``seed``, ``attack``, ``defense``, ``status`` (``done``,
    ``failed``, ``missing``) and, when done, ``acc asr tpr fpr cad`` (percent) as the table shows
    them (for a ``no_detection`` defense TPR/FPR are ``None``; CAD by the one rule of
    :func:`marsjax.metrics.cad`, the mean of the defined terms),
    ``rounds``, ``wall_s``, ``commit`` and ``dirty`` (the code that made it: ``None`` for runs
    written before marsjax recorded it), ``records`` (the run's metrics.jsonl).
    """
    from marsjax.defenses import NO_DETECTION
    from marsjax.metrics import cad

    out = pathlib.Path(out_dir)
    index = _read_json(out / SWEEP_FILE)
    if index is None:
        raise ConfigError(f"{out} holds no {SWEEP_FILE}: not a sweep results folder")
    rows = []
    for r in index["runs"]:
        d = out / r["dir"]
        row = {k: r[k] for k in ("id", "labels", "seed", "attack", "defense")}
        summary = _read_json(d / "summary.json")
        if summary is None:
            row["status"] = "failed" if (d / "error.txt").exists() else "missing"
            rows.append(row)
            continue
        row["status"] = "done"
        for k in COLUMNS:
            v = summary.get(k)
            row[k] = None if v is None or not math.isfinite(v) else float(v)
        if r["defense"] in index.get("no_detection", []) or r["defense"] in NO_DETECTION:
            row["tpr"] = row["fpr"] = None
        # One CAD rule everywhere (marsjax.metrics.cad): the mean of the defined terms.
        if row["acc"] is not None and row["asr"] is not None:
            row["cad"] = cad(row["acc"], row["asr"], row["tpr"], row["fpr"])
        row["rounds"] = summary.get("rounds")
        row["wall_s"] = summary.get("wall_s")
        row["commit"] = summary.get("commit")
        row["dirty"] = summary.get("dirty")
        path = d / "metrics.jsonl"
        row["records"] = (
            [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if path.exists()
            else []
        )
        rows.append(row)
    return index, rows


def _row_key(index: dict, row: dict) -> tuple[str, ...]:
    return tuple(row["labels"][a] for a in index["rows"])


def _row_name(index: dict, key: tuple[str, ...]) -> str:
    parts = []
    for a, label in zip(index["rows"], key):
        parts.append(label if a in _NAME_AXES else f"{_short(a)}={label}")
    return ", ".join(parts) or "–"


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f}" if std is None else f"{mean:.2f}±{std:.2f}"


def commit_label(row: Mapping[str, Any]) -> str:
    """The code that made a run: the short commit, ``+dirty`` with uncommitted changes, or
    ``unrecorded`` (a run written before marsjax recorded its commit)."""
    commit = row.get("commit")
    if not commit:
        return "unrecorded"
    return commit[:10] + ("+dirty" if row.get("dirty") else "")


class MixedCommitsError(ConfigError):
    """The finished runs of a sweep were made by different code."""


def check_commits(rows: Sequence[Mapping[str, Any]], allow_mixed: bool = False) -> list[str]:
    """The commits of the finished runs (sorted); raises :class:`MixedCommitsError` when there
    is more than one and ``allow_mixed`` is false, naming each commit and its runs."""
    by: dict[str, list[str]] = {}
    for row in rows:
        if row["status"] == "done":
            by.setdefault(commit_label(row), []).append(row["id"])
    if len(by) > 1 and not allow_mixed:
        parts = [
            f"{c}: {len(ids)} runs ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"
            for c, ids in sorted(by.items())
        ]
        raise MixedCommitsError(
            "the finished runs were made by different code (" + "; ".join(parts) + "); rerun "
            "the stale runs (delete their folders) or pass --allow-mixed-commits to write a "
            "table that names each cell's commit"
        )
    return sorted(by)


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _cells(index: dict, rows: Sequence[dict]) -> dict[tuple[tuple[str, ...], str], dict]:
    """(row key, column label) -> mean and population std (``<col>_std``, ``None`` below two
    values) of each column over the seeds, ``n`` done, ``failed``, ``commits``."""
    groups: dict[tuple[tuple[str, ...], str], list[dict]] = {}
    for row in rows:
        groups.setdefault((_row_key(index, row), row["labels"][index["cols"]]), []).append(row)
    cells = {}
    for k, members in groups.items():
        done = [m for m in members if m["status"] == "done"]
        cell = {c: _mean([m[c] for m in done]) for c in COLUMNS}
        for c in COLUMNS:
            vals = [m[c] for m in done if m[c] is not None]
            cell[c + "_std"] = float(np.std(vals)) if len(vals) > 1 else None
        cell["n"] = len(done)
        cell["failed"] = sum(m["status"] == "failed" for m in members)
        cell["commits"] = sorted({commit_label(m) for m in done})
        cells[k] = cell
    return cells


def wide_table(index: dict, rows: Sequence[dict]) -> str:
    """The paper's layout: a row per row key, a column per column label, cells
    ``ACC/ASR/TPR/FPR/CAD`` (``–`` where not applicable); with several seeds every value is
    ``mean±std`` over the seeds (population std) and the seed count follows."""
    cells = _cells(index, rows)
    col_labels = index["axes"][index["cols"]]
    row_keys = list(itertools.product(*(index["axes"][a] for a in index["rows"])))
    head_rows = " × ".join(_short(a) for a in index["rows"]) or "run"
    lines = [
        f"| {head_rows} | " + " | ".join(col_labels) + " |",
        "|---|" + "---|" * len(col_labels),
    ]
    for key in row_keys:
        out = []
        for col in col_labels:
            cell = cells.get((key, col))
            if cell is None or cell["n"] == 0:
                out.append("(failed)" if cell and cell["failed"] else "(not run)")
                continue
            if cell["n"] > 1:
                text = " / ".join(_mean_std(cell[c], cell[c + "_std"]) for c in COLUMNS)
                text += f" ({cell['n']} seeds)"
            else:
                text = "/".join(_num(cell[c]) for c in COLUMNS)
            out.append(text)
        lines.append(f"| {_row_name(index, key)} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def commits_table(index: dict, rows: Sequence[dict]) -> str:
    """The wide table's layout with each cell's commit(s)."""
    cells = _cells(index, rows)
    col_labels = index["axes"][index["cols"]]
    row_keys = list(itertools.product(*(index["axes"][a] for a in index["rows"])))
    lines = [
        "| "
        + (" × ".join(_short(a) for a in index["rows"]) or "run")
        + " | "
        + " | ".join(col_labels)
        + " |",
        "|---|" + "---|" * len(col_labels),
    ]
    for key in row_keys:
        vals = []
        for col in col_labels:
            cell = cells.get((key, col))
            vals.append(", ".join(cell["commits"]) if cell and cell["n"] else "")
        lines.append(f"| {_row_name(index, key)} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def runs_table(index: dict, rows: Sequence[dict]) -> str:
    """One row per run: axis labels, seed, ACC, ASR, TPR, FPR, CAD, rounds, wall time, commit."""
    axes = list(index["axes"])
    head = [*(_short(a) for a in axes), "seed", "ACC", "ASR", "TPR", "FPR", "CAD", "rounds", "s"]
    head.append("commit")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        vals = [row["labels"][a] for a in axes] + [str(row["seed"])]
        if row["status"] == "done":
            vals += [_num(row[c]) for c in COLUMNS]
            vals += [str(row.get("rounds")), f"{row.get('wall_s') or 0:.0f}", commit_label(row)]
        else:
            vals += [row["status"]] + [""] * 7
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def runs_csv(index: dict, rows: Sequence[dict]) -> str:
    import csv
    import io

    axes = list(index["axes"])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", *axes, "seed", "status", *COLUMNS, "rounds", "wall_s", "commit", "dirty"])
    for row in rows:
        w.writerow(
            [row["id"], *(row["labels"][a] for a in axes), row["seed"], row["status"]]
            + [("" if row.get(c) is None else repr(row[c])) for c in COLUMNS]
            + [row.get("rounds", ""), "" if row.get("wall_s") is None else f"{row['wall_s']:.1f}"]
            + [row.get("commit") or "", "" if row.get("dirty") is None else str(row["dirty"])]
        )
    return buf.getvalue()


def plot_heatmap(index: dict, rows: Sequence[dict], path: str | os.PathLike) -> None:
    """CAD (mean over seeds) over the table's rows x columns, annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _cells(index, rows)
    col_labels = index["axes"][index["cols"]]
    row_keys = list(itertools.product(*(index["axes"][a] for a in index["rows"])))
    grid = np.full((len(row_keys), len(col_labels)), np.nan)
    for i, key in enumerate(row_keys):
        for j, col in enumerate(col_labels):
            cell = cells.get((key, col))
            if cell is not None and cell["cad"] is not None:
                grid[i, j] = cell["cad"]
    fig, ax = plt.subplots(
        figsize=(1.6 + 1.3 * len(col_labels), 1.0 + 0.42 * len(row_keys)), squeeze=True
    )
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_keys)), [_row_name(index, k) for k in row_keys])
    ax.set_xlabel(_short(index["cols"]))
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            text = "–" if np.isnan(grid[i, j]) else f"{grid[i, j]:.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="CAD (%)")
    ax.set_title(f"{index['name']}: CAD")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep_curves(index: dict, rows: Sequence[dict], out_dir: str | os.PathLike) -> list[str]:
    """ACC (solid) and ASR (dashed) against the round, one line per row key (first seed), one
    figure per column label: ``curves_<label>.png``. Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(out_dir)
    names = []
    for col in index["axes"][index["cols"]]:
        members = [r for r in rows if r["labels"][index["cols"]] == col and r["status"] == "done"]
        if not members:
            continue
        seen = set()
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
        for i, row in enumerate(members):
            key = _row_key(index, row)
            if key in seen:
                continue
            seen.add(key)
            ev = [rec for rec in row["records"] if rec.get("acc") is not None]
            x = [rec["round"] for rec in ev]  # numbered as in metrics.jsonl
            color = plt.cm.tab10(len(seen) % 10)
            label = _row_name(index, key)
            ax1.plot(x, [rec["acc"] for rec in ev], "o-", color=color, label=label, ms=3)
            ax2.plot(x, [rec["asr"] for rec in ev], "s--", color=color, label=label, ms=3)
        ax1.set_title(f"ACC ({_short(index['cols'])}={col})")
        ax2.set_title(f"ASR ({_short(index['cols'])}={col})")
        for ax in (ax1, ax2):
            ax.set_xlabel("round (as in metrics.jsonl)")
            ax.set_ylim(-2, 102)
            ax.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.tight_layout()
        name = f"curves_{_safe(col)}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def write_outputs(
    out_dir: str | os.PathLike, *, allow_mixed_commits: bool = False
) -> dict[str, str]:
    """Writes table.md, table.csv, heatmap_cad.png and curves_*.png of a sweep results folder
    from its runs' files (also what ``marsjax plot`` does). Returns name -> path.

    The table says which commit made its cells; runs made by different code are refused
    (:class:`MixedCommitsError`) unless ``allow_mixed_commits``, and then every cell's commit is
    listed.
    """
    from marsjax.metrics import CAD_RULE

    out = pathlib.Path(out_dir)
    index, rows = collect(out)
    commits = check_commits(rows, allow_mixed_commits)
    done = sum(r["status"] == "done" for r in rows)
    failed = [r["id"] for r in rows if r["status"] == "failed"]
    md = [f"# {index['name']}", ""]
    if index.get("description"):
        md += [index["description"].strip(), ""]
    md += [
        f"{done} of {len(rows)} runs done"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + ". Cells: ACC/ASR/TPR/FPR/CAD (%); ACC/ASR at the last round, TPR/FPR means of the "
        f"per-round rates over the attack rounds; {CAD_RULE}"
        + (
            f"; {', '.join(index['no_detection'])} makes no detection decisions (TPR/FPR '–')"
            if index.get("no_detection")
            else ""
        )
        + ".",
        "",
    ]
    if len(commits) == 1:
        md += [f"Every finished run was made at commit {commits[0]}.", ""]
    elif len(commits) > 1:
        md += [
            (
                f"**The finished runs were made by {len(commits)} different code versions** "
                f"({', '.join(commits)}); each cell's commits are listed below the table."
            ),
            "",
        ]
    md += [wide_table(index, rows)]
    if len(commits) > 1:
        md += ["Commits per cell:", "", commits_table(index, rows), ""]
    md += ["## Runs", "", runs_table(index, rows)]
    paths = {"table.md": out / "table.md", "table.csv": out / "table.csv"}
    paths["table.md"].write_text("\n".join(md))
    paths["table.csv"].write_text(runs_csv(index, rows))
    if done:
        plot_heatmap(index, rows, out / "heatmap_cad.png")
        paths["heatmap_cad.png"] = out / "heatmap_cad.png"
        for name in plot_sweep_curves(index, rows, out):
            paths[name] = out / name
    return {k: str(v) for k, v in paths.items()}
