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
                          metrics.csv, curves.png (what ``marsjax run --out`` writes)
      pretrain/ ...       (when the sweep pretrains its clean start there)

The package's modules, by what they hold:

=============================  ===============================================================
:mod:`marsjax.sweep.grid`      :class:`Sweep`, :class:`SweepRun`, the axes, :func:`expand`,
                               :func:`select` (``--only``), :func:`load_sweep`,
                               :func:`project_root`
:mod:`marsjax.sweep.execution` :func:`run_sweep`, :func:`status`: what runs, resumes or is skipped
:mod:`marsjax.sweep.batched`   :func:`run_batched`: points along ``batch_axis`` as one program
:mod:`marsjax.sweep.runfiles`  the ``sweep.json`` index and each run's files
:mod:`marsjax.sweep.tables`    :func:`collect`, :func:`wide_table`, the runs table and CSV,
                               :func:`check_commits`
:mod:`marsjax.sweep.plots`     :func:`plot_heatmap`, :func:`plot_sweep_curves`
:mod:`marsjax.sweep.outputs`   :func:`write_outputs` (``marsjax plot``)
=============================  ===============================================================

Every name is importable from ``marsjax.sweep`` itself, as before the split.
"""

from marsjax.pretrain import PretrainSpec
from marsjax.sweep.batched import run_batched
from marsjax.sweep.execution import SweepResult, run_sweep, status
from marsjax.sweep.grid import Sweep, SweepRun, expand, load_sweep, project_root, select
from marsjax.sweep.outputs import write_outputs
from marsjax.sweep.plots import plot_heatmap, plot_sweep_curves
from marsjax.sweep.runfiles import SWEEP_FILE
from marsjax.sweep.tables import (
    COLUMNS,
    MixedCommitsError,
    check_commits,
    collect,
    commit_label,
    commits_table,
    runs_csv,
    runs_table,
    wide_table,
)

__all__ = [
    "COLUMNS",
    "SWEEP_FILE",
    "MixedCommitsError",
    "PretrainSpec",
    "Sweep",
    "SweepResult",
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
    "run_batched",
    "run_sweep",
    "runs_csv",
    "runs_table",
    "select",
    "status",
    "wide_table",
    "write_outputs",
]
