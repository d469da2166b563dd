"""Tables and plots for papers: paper-style markdown/CSV tables and per-round curves."""

from __future__ import annotations

import csv
import io
import math
import pathlib
from collections.abc import Sequence

__all__ = ["COLUMNS", "plot_curves", "summary_csv", "summary_markdown"]

COLUMNS = ("acc", "asr", "tpr", "fpr", "cad")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def summary_markdown(summaries: Sequence[dict], keys: Sequence[str] = ("attack", "defense")) -> str:
    """One row per run: the run's keys, then ACC / ASR / TPR / FPR / CAD (percent)."""
    head = [*keys, "ACC", "ASR", "TPR", "FPR", "CAD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        row = [str(s.get(k, "")) for k in keys] + [_fmt(s.get(c)) for c in COLUMNS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def summary_csv(summaries: Sequence[dict], keys: Sequence[str] = ("attack", "defense")) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*keys, *COLUMNS])
    for s in summaries:
        w.writerow([s.get(k, "") for k in keys] + [s.get(c) for c in COLUMNS])
    return buf.getvalue()


def plot_curves(records: Sequence[dict], path: str | pathlib.Path, title: str = "") -> None:
    """ACC and ASR (evaluated rounds) and TPR/FPR (every round) against the round number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ev = [r for r in records if r.get("acc") is not None]
    rounds = [r["round"] + 1 for r in ev]
    ax1.plot(rounds, [r["acc"] for r in ev], "o-", label="ACC")
    ax1.plot(rounds, [r["asr"] for r in ev], "s-", label="ASR")
    ax1.set_xlabel("round")
    ax1.set_ylabel("%")
    ax1.set_ylim(-2, 102)
    ax1.legend()
    ax1.grid(alpha=0.3)
    all_r = [r["round"] + 1 for r in records]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in records]

    ax2.plot(all_r, series("tpr"), ".-", label="TPR")
    ax2.plot(all_r, series("fpr"), ".-", label="FPR")
    ax2.set_xlabel("round")
    ax2.set_ylim(-2, 102)
    ax2.legend()
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
