"""How far two runs' global models are apart after their first rounds (a tie check).

Two defenses that accept the same clients in every round (a *tie*, as
``experiments/paper_tables.py`` reports them) give the same FedAvg step in exact arithmetic,
yet their tables can differ, because each sums the accepted updates in its own order. This
script rebuilds both runs from their ``config.json`` files, plays ``--rounds`` rounds of each
from the same initial state, and records per round the accepted weights, the training loss and
the largest absolute difference between the two global models (per leaf and over all leaves), so
a difference between two tied cells can be traced to float rounding amplified by training rather
than to a decision.

    python experiments/compare_first_rounds.py \\
        experiments/results/mnist_official/table2/runs/fedavg__3dfed__s0 \\
        experiments/results/mnist_official/table2/runs/fldetector__3dfed__s0 \\
        --rounds 2 --out experiments/results/mnist_official/tie_fedavg_fldetector_3dfed_s0.json

Run it with the code that made the runs (the ``commit`` in their ``config.json``; e.g. from a
worktree of that commit with ``PYTHONPATH`` set to it): the output records the commit of the
``marsjax`` it imported.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import numpy as np

from marsjax import simulation
from marsjax.config import from_dict
from marsjax.data import load_dataset
from marsjax.provenance import PROVENANCE_KEYS, provenance


def _load(run: pathlib.Path):
    d = json.loads((run / "config.json").read_text())
    return from_dict({k: v for k, v in d.items() if k not in PROVENANCE_KEYS}), d.get("commit")


def compare(run_a: pathlib.Path, run_b: pathlib.Path, rounds: int) -> dict:
    """The record described in the module docstring (without provenance)."""
    sims, states, commits = {}, [], []
    for run in (run_a, run_b):
        cfg, commit = _load(run)
        if run not in sims:  # a run compared with itself is built once
            sims[run] = simulation.build(cfg, load_dataset(cfg.data.name, cfg.data.data_dir))
        states.append(sims[run].init_state())
        commits.append(commit)
    pair = (sims[run_a], sims[run_b])
    out = []
    for r in range(rounds):
        metrics = []
        for i, sim in enumerate(pair):
            states[i], m = sim.round_step(states[i], sim.data)
            metrics.append(m)
        la, lb = (jax.tree.leaves(jax.tree.map(np.asarray, s.global_variables)) for s in states)
        diff = [float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(la, lb)]
        out.append(
            {
                "round": r,
                "same_accepted": bool(
                    np.array_equal(np.asarray(metrics[0]["accepted"]), metrics[1]["accepted"])
                ),
                "train_loss": [float(m["train_loss"]) for m in metrics],
                "bitwise_equal": all(np.array_equal(a, b) for a, b in zip(la, lb)),
                "max_abs_diff": max(diff),
                "max_abs_diff_per_leaf": diff,
                "max_abs_value_per_leaf": [float(np.max(np.abs(a))) for a in la],
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return {"runs": [str(run_a), str(run_b)], "runs_commits": commits, "rounds": out}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_a", type=pathlib.Path)
    p.add_argument("run_b", type=pathlib.Path)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=pathlib.Path, default=None)
    args = p.parse_args(argv)
    rec = {**compare(args.run_a, args.run_b, args.rounds), **provenance()}
    if args.out:
        args.out.write_text(json.dumps(rec, indent=1) + "\n")


if __name__ == "__main__":
    main()
