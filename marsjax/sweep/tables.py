"""A sweep's tables from its runs' files: :func:`collect` (one row per run), the paper-layout
:func:`wide_table` (mean±std over seeds), the per-run table and CSV, and the commit check.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from marsjax.config import (
    ConfigError,
)
from marsjax.sweep.grid import _NAME_AXES, _short
from marsjax.sweep.runfiles import COLUMNS, SWEEP_FILE, _num, _read_json


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
