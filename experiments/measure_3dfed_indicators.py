"""How large 3DFed's implanted indicators are next to the benign updates (measured, per round).

3DFed marks each upload by multiplying one small entry of the indicator layer (the last
convolution's kernel; ``conv2`` of the MNIST SimpleNet) by 1e5. Its code assumes the chosen
entries are about 1e-8, so that the marked entries stay tiny. This script runs a few 3DFed rounds
of a preset and records, per round: the implanted indicator values (after the x1e5), the entries
they came from, and the L2 norms of the benign and malicious uploads (params only, as a defense
that compares uploads sees them), with BatchNorm after the convolutions and without.

    python experiments/measure_3dfed_indicators.py --preset mnist_paper --rounds 3 \\
        --out experiments/results/mnist_paper/3dfed_indicators.json

The defense is FedAvg with the per-upload norms as its scores (nothing is rejected).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from marsjax import defenses, provenance, simulation
from marsjax.config import get_preset, override
from marsjax.defenses.base import Defense, DefenseResult, EmptyState
from marsjax.tree import weighted_mean

_NAME = "_fedavg_with_norms"


def _fedavg_with_norms(ctx) -> Defense:
    del ctx

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        del key, global_variables, client_ids
        sq = sum(
            jnp.sum(jnp.square(u.reshape(u.shape[0], -1)), axis=1)
            for u in jax.tree.leaves(updates["params"])
        )
        accepted = (client_weights > 0).astype(jnp.float32)
        return DefenseResult(weighted_mean(updates, client_weights), accepted, jnp.sqrt(sq)), state

    return Defense(lambda v: EmptyState(), apply)


def measure(preset: str, batch_norm: bool, rounds: int, data_dir: str, seed: int) -> dict:
    defenses.REGISTRY[_NAME] = _fedavg_with_norms
    cfg = override(
        get_preset(preset, defense="fedavg", attack="3dfed"),
        {
            "data.data_dir": data_dir,
            "model.batch_norm": batch_norm,
            "defense.name": _NAME,
            "run.rounds": rounds,
            "run.seed": seed,
        },
    )
    sim = simulation.build(cfg)
    state = sim.init_state()
    out = []
    for _ in range(rounds):
        state, m = sim.round_step(state, sim.data)
        a = state.attack_state
        mal = np.asarray(m["is_attacking"])
        norms = np.asarray(m["scores"])
        vals = np.asarray(a.values)[np.asarray(a.uploaded)]
        out.append(
            {
                "round": int(m["round"]),
                "indicator_values": [float(v) for v in vals],
                "indicator_entries": [float(v) / 1e5 for v in vals],
                "benign_norm_median": float(np.median(norms[~mal])),
                "benign_norm_max": float(norms[~mal].max()),
                "malicious_norms": [float(x) for x in norms[mal]],
                "scale": float(a.scale),
                "weak_dp": bool(a.weak_dp),
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return {"preset": preset, "batch_norm": batch_norm, "seed": seed, "rounds": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mnist_paper")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    res = [measure(args.preset, bn, args.rounds, args.data_dir, args.seed) for bn in (True, False)]
    record = provenance.with_provenance({"runs": res})
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
