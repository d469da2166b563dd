"""Tables and plots for papers: paper-style markdown/CSV tables and per-round curves."""

from __future__ import annotations

import csv
import io
import math
import pathlib
from collections.abc import Sequence

__all__ = [
    "COLUMNS",
    "SEED_METRICS",
    "curves_title",
    "plot_curves",
    "seeds_markdown",
    "seeds_summary",
    "summary_csv",
    "summary_markdown",
]

COLUMNS = ("acc", "asr", "tpr", "fpr", "cad")
# The metrics averaged over seeds (``marsjax run --seeds``).
SEED_METRICS = (
    "acc",
    "asr",
    "asr_excl_target",
    "tpr",
    "fpr",
    "cad",
    "tpr_excl_dropped",
    "fpr_excl_dropped",
    "dropped",
    "reverted",
)


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


def seeds_summary(summaries: Sequence[dict]) -> dict:
    """Mean and population standard deviation over the seeds of every metric of
    :data:`SEED_METRICS` (undefined values, e.g. TPR of FedCLP, are left out; ``None`` when no
    seed defines it), for runs of one experiment that differ only in ``run.seed``."""
    import numpy as np

    out = {
        "attack": summaries[0].get("attack"),
        "defense": summaries[0].get("defense"),
        "seeds": [s.get("seed") for s in summaries],
        "n": len(summaries),
        "mean": {},
        "std": {},
    }
    for k in SEED_METRICS:
        vals = [
            float(s[k])
            for s in summaries
            if isinstance(s.get(k), (int, float)) and math.isfinite(s[k])
        ]
        out["mean"][k] = float(np.mean(vals)) if vals else None
        out["std"][k] = float(np.std(vals)) if vals else None
    return out


def seeds_markdown(groups: Sequence[dict]) -> str:
    """One row per :func:`seeds_summary`: attack, defense, seeds, then ``mean ± std`` of each
    metric."""
    head = ["attack", "defense", "seeds", "ACC", "ASR", "ASR excl. target", "TPR", "FPR", "CAD"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        cells = [
            "–" if g["mean"][k] is None else f"{g['mean'][k]:.2f} ± {g['std'][k]:.2f}"
            for k in ("acc", "asr", "asr_excl_target", "tpr", "fpr", "cad")
        ]
        seeds = ",".join(str(x) for x in g["seeds"])
        lines.append("| " + " | ".join([str(g["attack"]), str(g["defense"]), seeds, *cells]) + " |")
    return "\n".join(lines) + "\n"


def summary_csv(summaries: Sequence[dict], keys: Sequence[str] = ("attack", "defense")) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow([*keys, *COLUMNS])
    for s in summaries:
        w.writerow([s.get(k, "") for k in keys] + [s.get(c) for c in COLUMNS])
    return buf.getvalue()


def curves_title(cfg) -> str:
    """``curves.png``'s title: the run's name, attack and defense (``quickstart: mra vs mars``)."""
    return f"{cfg.name}: attack {cfg.attack.name} vs defense {cfg.defense.name}"


def plot_curves(records: Sequence[dict], path: str | pathlib.Path, title: str = "") -> None:
    """ACC and ASR (evaluated rounds) and TPR/FPR (every round) against the round, numbered as
    ``metrics.jsonl`` numbers it (``round``: 0 is the first round; ACC/ASR are measured after
    it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ev = [r for r in records if r.get("acc") is not None]
    rounds = [r["round"] for r in ev]
    ax1.plot(rounds, [r["acc"] for r in ev], "o-", label="ACC")
    ax1.plot(rounds, [r["asr"] for r in ev], "s-", label="ASR")
    ax1.set_xlabel("round (as in metrics.jsonl)")
    ax1.set_ylabel("%")
    ax1.set_ylim(-2, 102)
    ax1.legend()
    ax1.grid(alpha=0.3)
    all_r = [r["round"] for r in records]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in records]

    ax2.plot(all_r, series("tpr"), ".-", label="TPR")
    ax2.plot(all_r, series("fpr"), ".-", label="FPR")
    ax2.set_xlabel("round (as in metrics.jsonl)")
    ax2.set_ylim(-2, 102)
    ax2.legend()
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
