"""A sweep's plots: the CAD heatmap and ACC/ASR curves per column."""

from __future__ import annotations

import itertools
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from marsjax.sweep.grid import _safe, _short
from marsjax.sweep.tables import _cells, _row_key, _row_name


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
