"""Writes a sweep results folder's ``table.md``, ``table.csv``, ``heatmap_cad.png`` and
``curves_*.png`` (:func:`write_outputs`, also ``marsjax plot``).
"""

from __future__ import annotations

import os
import pathlib

from marsjax.sweep.plots import plot_heatmap, plot_sweep_curves
from marsjax.sweep.tables import (
    check_commits,
    collect,
    commits_table,
    runs_csv,
    runs_table,
    wide_table,
)


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
