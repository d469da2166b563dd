"""Soak run: hundreds of rounds of the digits demo with checkpoints, memory sampled as it goes.

A long sweep must not grow in memory round after round (buffers kept alive by the host loop,
caches growing with every checkpoint, retracing). This runs ``--rounds`` rounds of the ``demo``
preset (digits, SimpleNet-small with BatchNorm, BadNets + scaling, 10 of 30 clients per round)
through :func:`marsjax.checkpoint.run_resumable` with a checkpoint every ``--checkpoint-every``
rounds and evaluation every ``--eval-every``, and samples after every ``--sample-every`` rounds:
the process's resident memory (RSS), the number and bytes of live JAX arrays, how many times the
round was traced, and the size of the records kept in memory (which grows by design: one record
per round).

One JSON line per sample, then one summary line, go to stdout and to ``--out`` (default
``benchmarks/results/soak_memory_<backend>.jsonl``)::

    python -m benchmarks.soak_memory --rounds 300
    python -m benchmarks.soak_memory --rounds 300 --checkpoint-every 0 --append   # control

The summary compares RSS after the warm-up (``--warmup`` rounds: compilation, first checkpoint,
first evaluation) with the end: ``rss_growth_mb`` and ``rss_slope_mb_per_100_rounds`` (least
squares over the samples after the warm-up), ``live_arrays_min/max`` after the warm-up and
``traces``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax
import numpy as np
import psutil

from marsjax import checkpoint
from marsjax.config import get_preset, override


def _live() -> tuple[int, int]:
    arrays = jax.live_arrays()
    return len(arrays), int(sum(a.nbytes for a in arrays))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--defense", default="fedavg")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--sample-every", type=int, default=10)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--out", help="JSON lines file (default benchmarks/results/...)")
    p.add_argument("--run-dir", help="results folder of the run (default: a temporary one)")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing")
    args = p.parse_args(argv)

    backend = jax.default_backend()
    out_path = pathlib.Path(
        args.out or pathlib.Path(__file__).parent / "results" / f"soak_memory_{backend}.jsonl"
    )
    proc = psutil.Process()
    tmp = None
    run_dir = args.run_dir
    if run_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="marsjax_soak_")
        run_dir = tmp.name
    cfg = override(
        get_preset("demo", defense=args.defense),
        {
            "run.rounds": args.rounds,
            "run.eval_every": args.eval_every,
            "run.checkpoint_every": args.checkpoint_every,
            "run.out_dir": str(pathlib.Path(run_dir) / "run"),
        },
    )
    common = {
        "case": f"soak:{cfg.name}:{args.defense}",
        "backend": backend,
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
    }
    samples: list[dict] = []
    t0 = time.perf_counter()
    sim_ref: dict = {}

    def sample(state, records):
        rnd = int(state.round)
        if rnd % args.sample_every and rnd != args.rounds:
            return
        n, nbytes = _live()
        samples.append(
            {
                **common,
                "round": rnd,
                "rss_mb": proc.memory_info().rss / 2**20,
                "live_arrays": n,
                "live_array_mb": nbytes / 2**20,
                "records_kb": len(json.dumps(records)) / 1024,
                "checkpoints": checkpoint.latest_round(cfg.run.out_dir),
                "elapsed_s": time.perf_counter() - t0,
            }
        )
        print(json.dumps(samples[-1]), flush=True)

    res = checkpoint.run_resumable(cfg, progress=False, callback=sample)
    sim_ref["traces"] = res["sim"].traces
    after = [s for s in samples if s["round"] >= args.warmup]
    x = np.array([s["round"] for s in after], float)
    y = np.array([s["rss_mb"] for s in after])
    slope = float(np.polyfit(x, y, 1)[0] * 100) if len(after) >= 2 else float("nan")
    summary = {
        **common,
        "summary": True,
        "rounds": args.rounds,
        "checkpoint_every": args.checkpoint_every,
        "eval_every": args.eval_every,
        "warmup_rounds": args.warmup,
        "rss_mb_after_warmup": after[0]["rss_mb"] if after else None,
        "rss_mb_end": samples[-1]["rss_mb"],
        "rss_growth_mb": samples[-1]["rss_mb"] - after[0]["rss_mb"] if after else None,
        "rss_slope_mb_per_100_rounds": slope,
        "rss_peak_mb": max(s["rss_mb"] for s in samples),
        "live_arrays_min": min(s["live_arrays"] for s in after) if after else None,
        "live_arrays_max": max(s["live_arrays"] for s in after) if after else None,
        "live_array_mb_max": max(s["live_array_mb"] for s in after) if after else None,
        "records_kb_end": samples[-1]["records_kb"],
        "traces": sim_ref["traces"],
        "final_acc": res["summary"].get("acc"),
        "final_asr": res["summary"].get("asr"),
        "wall_s": time.perf_counter() - t0,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "command": " ".join([os.path.basename(sys.executable), "-m", "benchmarks.soak_memory"])
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date": datetime.date.today().isoformat(),
    }
    print(json.dumps(summary), flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "a" if args.append else "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in [*samples, summary])
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
