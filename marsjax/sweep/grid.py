"""The grid of a sweep: :class:`Sweep` (a base config and named axes), its points
(:class:`SweepRun`, :func:`expand`, :func:`select`) and loading a sweep file.

**Axes.** ``axes`` maps an axis name to its values, in order. A dotted config path
(``"defense.name"``, ``"defense.options.epsilon"``, ``"data.dirichlet_alpha"``) takes a list of
values. Any name takes a mapping ``{label: {dotted path: value, ...}}`` for points that change
several fields together (the attacker ratio changes ``attack.num_attackers`` and
``attack.attackers_per_round``). Choosing ``attack.name`` / ``defense.name`` also replaces the
section's options by ``attack_options[name]`` / ``defense_options[name]`` (default ``{}``), so a
grid never carries one defense's options into another; the other axes apply after that.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from marsjax.config import (
    ConfigError,
    ExperimentConfig,
    override,
    parse_overrides,
    validate,
)
from marsjax.pretrain import PretrainSpec

_NAME_AXES = ("attack.name", "defense.name")


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
