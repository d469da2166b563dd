"""Where a local SGD step of SimpleNet spends its time: per-HLO-op table from a profiler trace.

Runs ``--steps`` local steps of one client (the loop of :func:`benchmarks.conv_impl.make_local_train`)
under :func:`jax.profiler.trace`, with XLA:CPU's per-thunk trace events switched on
(``--xla_cpu_enable_xprof_traceme``) and the optimised HLO dumped, then sums the trace events per
HLO instruction and prints them with their shape and the JAX operation they came from
(``jvp(...)`` = forward, ``transpose(jvp(...))`` = backward).

Caveats: tracing adds overhead per op; XLA:CPU runs independent ops concurrently and splits large
ones over threads, so the per-op sums do not add up to the wall time. Use it to rank, then time the
candidates end to end with ``benchmarks/conv_impl.py``.

Usage::

    python benchmarks/profile_step.py --impl im2col [--bn] [--steps 20]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", default="im2col")
    ap.add_argument("--bn", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args(argv)

    work = tempfile.mkdtemp(prefix="profile_step_")
    dump = os.path.join(work, "hlo")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_enable_xprof_traceme=true --xla_dump_to={dump} --xla_dump_hlo_as_text"
        + " --xla_dump_hlo_module_re=.*local_steps.*"
    )
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.conv_impl import make_local_train
    from marsjax.models.cnn import SimpleNet

    model = SimpleNet(batch_norm=args.bn, conv_impl=args.impl)
    batch = 64
    samples = args.steps * batch
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (samples, 28, 28, 1), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, 10, samples).astype(np.int32))
    idx = jnp.arange(samples, dtype=jnp.int32)
    v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    train = make_local_train(model, batch_size=batch, epochs=1, max_len=samples)

    def local_steps(p, bs, key, x, y, idx):
        return train(p, bs, key, x, y, idx, samples)

    f = jax.jit(local_steps)
    a = (v["params"], v.get("batch_stats", {}), jax.random.key(1), x, y, idx)
    jax.block_until_ready(f(*a))
    trace_dir = os.path.join(work, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.runs):
            jax.block_until_ready(f(*a))

    tf = max(glob.glob(trace_dir + "/**/*.trace.json.gz", recursive=True), key=os.path.getmtime)
    with gzip.open(tf) as fh:
        d = json.load(fh)
    events = d["traceEvents"] if isinstance(d, dict) else d
    total = collections.Counter()
    count = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            total[e["name"]] += e.get("dur", 0)
            count[e["name"]] += 1
    hlo = max(glob.glob(dump + "/*local_steps*cpu_after_optimizations.txt"), key=os.path.getsize)
    info = {}
    with open(hlo) as fh:
        lines = fh.readlines()
    for line in lines:
        m = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if m:
            meta = re.search(r'op_name="([^"]+)"', line)
            op = meta.group(1).split("while/body/")[-1] if meta else ""
            info[m.group(1)] = (m.group(2).split("{")[0], m.group(3), op[:80])
    rows = sorted(
        ((v / args.runs / args.steps / 1e3, k) for k, v in total.items() if k in info),
        reverse=True,
    )
    print(f"# impl={args.impl} bn={args.bn} steps={args.steps} (ms per step, traced)")
    print(f"{'ms/step':>8} {'hlo':28s} {'shape':28s} {'kind':12s} from")
    for ms, k in rows[: args.top]:
        shape, kind, op = info[k]
        print(f"{ms:8.3f} {k:28s} {shape:28s} {kind:12s} {op}")
    print(f"{sum(r[0] for r in rows):8.3f} total over {len(rows)} ops (ms per step, traced)")


if __name__ == "__main__":
    main()
