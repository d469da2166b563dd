"""Running a sweep: the status of every run, what is run, resumed or skipped, failures recorded.

**Resuming.** A run whose folder holds ``summary.json`` written for the same config is skipped;
a run interrupted after a checkpoint (``checkpoint_every``) resumes from it
(:func:`marsjax.simulation.run_resumable`); any other run starts over. A finished run whose
config changed is refused (naming the fields) unless ``redo_changed``. A run that fails is
recorded in its ``error.txt`` and the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from marsjax.config import (
    ConfigError,
    ExperimentConfig,
    to_dict,
)
from marsjax.sweep.batched import run_batched
from marsjax.sweep.grid import Sweep, SweepRun, expand, select
from marsjax.sweep.outputs import write_outputs
from marsjax.sweep.runfiles import _clear, _fmt_summary, _read_json, _write_index


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


def _run_one(run: SweepRun, dataset: Any, progress: bool) -> dict:
    from marsjax import simulation

    st = status(run)
    if st != "partial":
        _clear(run.out_dir)
    res = simulation.run_resumable(
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
