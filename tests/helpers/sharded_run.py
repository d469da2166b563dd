"""Subprocess helper: runs the digits demo for a few rounds and writes the result as JSON.

Usage: ``python sharded_run.py OUT.json DEVICES [PROCESS_ID NUM_PROCESSES PORT] [--no-mesh]``.
``DEVICES`` fake CPU devices per process; with the three extra arguments it joins a multi-process
run through ``jax.distributed`` (gloo collectives on the CPU).
"""

import json
import os
import sys

args = [a for a in sys.argv[1:] if not a.startswith("--")]
out, devices = args[0], int(args[1])
# the test run's XLA flags (its compile settings) without any device count, then this one's
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join([*_flags, f"--xla_force_host_platform_device_count={devices}"])
os.environ["JAX_PLATFORMS"] = "cpu"

from marsjax import sharding

if len(args) == 5:
    pid, nproc, port = int(args[2]), int(args[3]), args[4]
    sharding.initialize(f"localhost:{port}", nproc, pid)

import jax
import numpy as np

from marsjax import simulation
from marsjax.config import get_preset, override

cfg = override(
    get_preset("demo", defense="fedavg"),
    {
        "run.rounds": 3,
        "run.eval_every": 3,
        "run.clients_per_round": 8,
        "attack.attackers_per_round": 2,
    },
)
sim = simulation.build(cfg, mesh=None if "--no-mesh" in sys.argv else "auto")
res = simulation.run(cfg, sim=sim, progress=False)
leaves = [
    np.asarray(sharding.to_host(x), np.float64)
    for x in jax.tree.leaves(res["state"].global_variables)
]
with open(out, "w") as f:
    json.dump(
        {
            "devices": jax.device_count(),
            "processes": jax.process_count(),
            "mesh": None if sim.mesh is None else int(sim.mesh.size),
            "summary": {k: res["summary"][k] for k in ("acc", "asr", "tpr", "fpr")},
            "records": [
                {k: r[k] for k in ("client_ids", "accepted", "train_loss")} for r in res["records"]
            ],
            "leaves": [x.ravel().tolist() for x in leaves],
        },
        f,
    )
