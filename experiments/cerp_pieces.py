"""Per trigger piece: how many CerP uploads a defense rejected, from runs' ``metrics.jsonl``.

CerP's distributed trigger gives the attacker with client id ``i`` piece ``i mod 4`` (rows 0 and 4,
columns 0-5 and 9-14; ``marsjax.attacks._cerp.cerp_pieces``). This reads each run's per-round
``client_ids``, ``is_attacking`` and ``accepted`` and prints, per piece, rejected / uploaded::

    python experiments/cerp_pieces.py experiments/results/fmnist_cpu/cerp_checks/*/

Used for the CerP analysis in ``experiments/README.md``.
"""

from __future__ import annotations

import json
import pathlib
import sys

PIECES = ("row 0, cols 0-5", "row 0, cols 9-14", "row 4, cols 0-5", "row 4, cols 9-14")


def per_piece(metrics: pathlib.Path) -> list[tuple[int, int]]:
    """``[(rejected, uploaded)]`` per piece over every round of a run."""
    counts = [[0, 0] for _ in PIECES]
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "accepted" not in r:
            continue
        for cid, attacking, acc in zip(r["client_ids"], r["is_attacking"], r["accepted"]):
            if attacking:
                counts[cid % 4][0] += acc < 0.5
                counts[cid % 4][1] += 1
    return [tuple(c) for c in counts]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print("| run | TPR | " + " | ".join(PIECES) + " |")
    print("|---|---|" + "---|" * len(PIECES))
    for d in map(pathlib.Path, argv):
        counts = per_piece(d / "metrics.jsonl")
        tpr = json.loads((d / "summary.json").read_text()).get("tpr")
        cells = [f"{rej}/{n} ({100 * rej / n:.0f} %)" if n else "-" for rej, n in counts]
        print(f"| {d.name} | {tpr:.1f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
