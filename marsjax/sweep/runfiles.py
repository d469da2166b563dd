"""What a sweep writes: the grid's index (``sweep.json``) and each run's folder (cleared
before a fresh start, finished with the files ``marsjax run --out`` writes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from marsjax.config import (
    ExperimentConfig,
)
from marsjax.sweep.grid import Sweep, SweepRun, _axis_points

SWEEP_FILE = "sweep.json"
COLUMNS = ("acc", "asr", "tpr", "fpr", "cad")


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


def _finish_run(cfg: ExperimentConfig, records: list[dict], wall_s: float) -> dict:
    """Writes summary.json, summary.md and curves.png of a run as simulation.run does."""
    from marsjax import provenance, report, run_logs
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
    summary = provenance.with_provenance(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(report.summary_markdown([summary]))
    try:
        report.plot_curves(records, out / "curves.png", title=report.curves_title(cfg))
    except Exception as e:  # noqa: BLE001 (plotting must never lose a finished run)
        (out / "plot_error.txt").write_text(f"{type(e).__name__}: {e}\n")
    return summary


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


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.2f}"


def _fmt_summary(s: Mapping[str, Any]) -> str:
    return " ".join(f"{k.upper()} {_num(s.get(k))}" for k in COLUMNS)
