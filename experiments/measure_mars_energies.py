"""Per round, the concentrated backdoor energy (CBE) of the attackers' and the benign uploads.

MARS keeps the cluster whose centre has the smaller L1 norm of CBE, so it fails whenever the
attackers' CBE falls below the benign clients' (the paper's adaptive attack does that on
purpose; MARS* keeps the majority instead). This script runs a config with MARS deciding
exactly as in the table's run and records, per round, the L1 norm (sum) of every upload's CBE
vector and the W1 gap between the two cluster centres, so that one can see when and why MARS
keeps the wrong cluster.

    python experiments/measure_mars_energies.py experiments/configs/table2_mnist_official.py \\
        --out experiments/results/mnist_official/mars_energies_3dfed_s0.json

The defense is MARS with the config's options; its ``scores`` are replaced by each row's CBE L1
norm (logging only: the accepted sets and the aggregate are MARS's own).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from marsjax import defenses, provenance, simulation
from marsjax.cli_common import load_config
from marsjax.config import override
from marsjax.defenses.base import Defense, DefenseResult
from marsjax.mars.defense import _build as build_mars
from marsjax.mars.defense import mars_cbe, model_energy_layout

_NAME = "_mars_energy_probe"


def _probe(ctx, **options) -> Defense:
    inner = build_mars(ctx, **options)
    x = jax.ShapeDtypeStruct((1, *ctx.image_shape), jnp.float32)
    layout = model_energy_layout(ctx.model, x, layers=options.get("layers", "conv_bn"))
    kappa = options.get("kappa", 0.05)

    def apply(key, updates, state, *, global_variables, client_weights, client_ids=None):
        result, state = inner.apply(
            key,
            updates,
            state,
            global_variables=global_variables,
            client_weights=client_weights,
            client_ids=client_ids,
        )
        cbe = mars_cbe(updates, global_variables, layout, kappa=kappa)
        return DefenseResult(result.update, result.accepted, jnp.sum(cbe, axis=1)), state

    return Defense(inner.init, apply)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a preset or a config file (its MARS x attack cell)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cfg = load_config(args.config, args.set)
    if cfg.defense.name not in ("mars", "mars_star"):
        raise SystemExit(f"the config's defense is {cfg.defense.name!r}, not MARS")
    options = dict(cfg.defense.options)
    if cfg.defense.name == "mars_star":
        options["select"] = "majority"
    defenses.REGISTRY[_NAME] = _probe
    cfg = override(cfg, {"defense.name": _NAME, "defense.options": options, "run.out_dir": None})
    sim = simulation.build(cfg)
    state = sim.init_state()
    rounds = []
    for _ in range(cfg.run.rounds):
        state, m = sim.round_step(state, sim.data)
        m = jax.tree.map(np.asarray, m)
        mal, acc, l1 = m["is_attacking"], m["accepted"] > 0.5, m["scores"]
        rec = {
            "round": int(m["round"]),
            "tpr": float(m["tpr"]),
            "fpr": float(m["fpr"]),
            "attacker_cbe_l1": [float(v) for v in l1[mal]],
            "benign_cbe_l1": [float(v) for v in l1[~mal]],
            "accepted_benign_cbe_l1_mean": float(l1[~mal & acc].mean())
            if (~mal & acc).any()
            else None,
            "rejected_benign_cbe_l1_mean": float(l1[~mal & ~acc].mean())
            if (~mal & ~acc).any()
            else None,
            "attackers_below_benign_median": int((l1[mal] < np.median(l1[~mal])).sum()),
        }
        rounds.append(rec)
        print(
            json.dumps({k: v for k, v in rec.items() if "cbe_l1" not in k or "mean" in k}),
            flush=True,
        )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = provenance.with_provenance({"config": args.config, "set": args.set, "rounds": rounds})
    out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
