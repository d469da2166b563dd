"""Does the code checked out now reproduce a committed run? Its first rounds, replayed.

A committed results folder records the commit that made it (``config.json``). The library moves
on after that commit, and a researcher who reruns the same config with newer code should know
whether they get the committed numbers. This script rebuilds each given run from its
``config.json`` with the ``marsjax`` it imports, plays ``--rounds`` rounds from the run's own
initial state, and sets every round's record (what ``metrics.jsonl`` holds, minus the timing and
the evaluation) beside the committed one: the sampled clients, who attacked, who was accepted,
the training loss and the defense's scores. ``identical`` means every field both records hold
is bitwise equal (fields the newer code adds are listed, not compared); ``same_decisions`` that
the clients, attackers and accepted sets are.

    python experiments/replay_check.py \\
        experiments/results/mnist_paper/table2/runs/mars__3dfed__s0 --rounds 3 \\
        --out experiments/results/mnist_paper/replay_mars_3dfed_s0.json

Why it matters here: in the MNIST federations (random start, lr 0.1) a difference of one float
rounding in round 0 grows to 0.05 in the weights after round 1
(``results/mnist_official/tie_fedavg_fldetector_3dfed_s0.json``), so a run that is not bitwise
identical from the first round on is another sample of the same experiment, not the committed
one.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from marsjax import simulation
from marsjax.config import from_dict
from marsjax.data import load_dataset
from marsjax.provenance import PROVENANCE_KEYS, provenance

DECISION_KEYS = ("client_ids", "is_attacking", "accepted")


def _committed(run: pathlib.Path) -> tuple[dict, str | None, list[dict]]:
    d = json.loads((run / "config.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    return {k: v for k, v in d.items() if k not in PROVENANCE_KEYS}, d.get("commit"), rows


def _max_diff(a, b) -> tuple[float | None, float | None]:
    """Largest absolute and relative difference of two equal-length number lists (None: n/a)."""
    if a is None or b is None:
        return None, None
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    if x.shape != y.shape:
        return None, None
    if x.size == 0:
        return 0.0, 0.0
    nan_x, nan_y = np.isnan(x), np.isnan(y)
    x, y = np.where(nan_x, 0.0, x), np.where(nan_y, 0.0, y)
    one_nan = nan_x != nan_y  # NaN on one side only: infinitely apart; on both: equal
    d = np.where(one_nan, np.inf, np.abs(x - y))
    rel = np.where(one_nan, np.inf, d / np.maximum(np.abs(x), 1e-30))
    return float(np.max(d)), float(np.max(rel))


def compare_round(committed: dict, replayed: dict) -> dict:
    """One round's comparison (the fields described in the module docstring)."""
    keys = sorted(set(committed) & set(replayed))  # the round's own fields, no eval or timing
    differing = [k for k in keys if committed[k] != replayed[k]]
    loss_abs, _ = _max_diff([committed.get("train_loss")], [replayed.get("train_loss")])
    score_abs, score_rel = _max_diff(committed.get("scores"), replayed.get("scores"))
    return {
        "round": committed.get("round"),
        "identical": not differing,
        "same_decisions": all(committed.get(k) == replayed.get(k) for k in DECISION_KEYS),
        "differing_fields": differing,
        "fields_only_replayed": sorted(set(replayed) - set(committed)),
        "train_loss": [committed.get("train_loss"), replayed.get("train_loss")],
        "train_loss_abs_diff": loss_abs,
        "scores_max_abs_diff": score_abs,
        "scores_max_rel_diff": score_rel,
    }


def replay(run: pathlib.Path, rounds: int, build=simulation.build, dataset=load_dataset) -> dict:
    """Replays ``rounds`` rounds of ``run`` and compares them with its ``metrics.jsonl``."""
    cfg_dict, commit, rows = _committed(run)
    if rounds > len(rows):
        raise SystemExit(f"{run}: only {len(rows)} committed rounds, asked for {rounds}")
    cfg = from_dict(cfg_dict)
    sim = build(cfg, dataset(cfg.data.name, cfg.data.data_dir))
    state = sim.init_state()
    out = []
    for r in range(rounds):
        state, metrics = sim.round_step(state, sim.data)
        out.append(compare_round(rows[r], simulation._to_record(metrics)))
        print(json.dumps({"run": str(run), **out[-1]}), flush=True)
    first = lambda key: next((c["round"] for c in out if not c[key]), None)
    return {
        "run": str(run),
        "run_commit": commit,
        "rounds_replayed": rounds,
        "all_identical": all(c["identical"] for c in out),
        "first_round_not_identical": first("identical"),
        "first_round_other_decisions": first("same_decisions"),
        "rounds": out,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", type=pathlib.Path, nargs="+", help="committed run folders")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    rec = {"replays": [replay(run, args.rounds) for run in args.runs], **provenance()}
    if args.out:
        args.out.write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
