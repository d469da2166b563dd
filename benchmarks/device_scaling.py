"""The same round on 1, 2, 4, 8 devices: the client axis sharded over a ``"clients"`` mesh.

Each device count runs in its own process (``benchmarks.round_throughput`` with the case given by
``--case``), so that the device count can be set before JAX starts. On a CPU host the devices are
fake (``XLA_FLAGS=--xla_force_host_platform_device_count=N``): they split the same cores, so this
shows the cost of the sharded program (partitioning, collectives) rather than a speed-up; on a
GPU host pass ``--real``: the first N GPUs are made visible (``CUDA_VISIBLE_DEVICES=0,..,N-1``).

    python -m benchmarks.device_scaling --devices 1,2,4,8 --case simplenet:40:300

Appends one JSON line per device count (the ``round_throughput`` record, whose ``num_devices``
says how many devices the round ran on) to ``--out`` (default
``benchmarks/results/device_scaling_<backend>.jsonl``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    p.add_argument("--case", default="simplenet:40:300", help="a round_throughput case")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="cpu", help="cpu (fake devices) or the real backend")
    p.add_argument("--real", action="store_true", help="the first N real GPUs")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = args.out or f"benchmarks/results/device_scaling_{args.backend}.jsonl"
    status = 0
    for n in [int(x) for x in args.devices.split(",") if x]:
        env = dict(os.environ)
        if args.real:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(n)))
        else:
            env["JAX_PLATFORMS"] = "cpu"
            flags = env.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.round_throughput",
            "--cases",
            args.case,
            "--repeats",
            str(args.repeats),
            "--out",
            out,
        ]
        print(f"# {n} device(s): {' '.join(cmd[1:])}", flush=True)
        rc = subprocess.call(cmd, env=env)
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
