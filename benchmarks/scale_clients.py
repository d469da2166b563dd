"""Scale on one device: federations of 1,000,000 registered clients, rounds of 10,000 clients.

Four cases, each run in its own subprocess so that its peak resident memory (``peak_rss_mb``,
``getrusage`` max RSS of that process: the JAX runtime and the dataset included) is its own:

``partition``
    Building the client partition of a 60,000-label training set (MNIST's size, random labels)
    for 10,000 / 100,000 / 1,000,000 registered clients: the per-class Dirichlet split
    (``dirichlet_s``, array operations only), the same split built the earlier way with one index
    list per client (``per_client_lists_s``, up to ``--ref-max`` clients: it is the reference the
    tests compare against) and ``sampled`` (every client draws ``--per-client`` distinct samples;
    clients overlap). ``indices_mb``: the padded ``[clients, max_len]`` index matrix that goes to
    the device.
``sampling``
    ``sample_clients`` (the round's draw without replacement, 20 % attackers) from 1,000,000
    registered clients, jitted, per call.
``round``
    One compiled round (median of ``--repeats`` after the compiling one) with 1,000,000
    registered clients on the bundled digits dataset (``sampled`` partition, ``--per-client``
    images each, one local step of batch ``--per-client``), 20 % attackers (BadNets), FedAvg or
    MARS, SimpleNet-small (13,706 parameters, 8x8 inputs) at 100 / 1,000 / 10,000 clients per
    round and the paper SimpleNet (431,080 parameters, 28x28 synthetic inputs) at 100 / 1,000.
    The client axis runs as ``lax.map`` in chunks of ``chunk`` clients (``run.client_chunk``):
    the training's activations and optimizer state are bounded by the chunk. ``updates_mb`` is
    the stacked uploads ``[clients, parameters]`` float32, which every defense receives whole.
``mars_select``
    MARS's second stage alone (the W1 matrix between CBE vectors, 2-means with 10 restarts, the
    decision) on ``n`` random CBE rows of length 250 (ResNet-18's), 20 % of them shifted, with
    the official code's clustering and with the paper's (``clustering``).
    ``w1_matrix_mb``: the ``n x n`` float32 matrix the official rule builds.

What bounds the scale, and the plan where it does not fit:

* The uploads: every defense here reads all ``clients x parameters`` values at once (MARS's
  clustering, Multi-Krum's distances, FLAME's HDBSCAN are not sums over clients), so the round's
  memory grows with that product, not with the chunk. 10,000 paper-SimpleNet uploads are 17 GB,
  1,000 ResNet-18 uploads 45 GB: over this machine's memory; they need a GPU with that much memory
  or the client axis sharded over devices (``run.shard_clients``). FedAvg alone could stream
  (accumulate each chunk's weighted sum inside the ``lax.map``); not implemented, as FedAvg is the
  no-defense baseline.
* MARS at 10,000 uploads: the CBE stage is already a ``lax.map`` over clients (memory bounded by
  its chunk). The official code's clustering (``clustering="code"``, the default) runs Euclidean
  2-means on the *rows* of the ``n x n`` W1 matrix: the matrix is its feature space, so memory
  and each Lloyd iteration are ``O(n^2)`` (400 MB at 10,000 uploads, 40 GB at 100,000). Past what
  fits, the plan: ``clustering="paper"`` (the paper's Algorithm 1, W1 2-means on the CBE vectors
  themselves, already an option) needs ``O(n M)`` memory (``M`` = CBE length); keeping the
  official rule instead means recomputing blocks of D's rows inside every Lloyd iteration
  (``O(n x block)`` memory at ``M`` times the arithmetic). Both rules are measured here
  (``clustering``).

Run (the committed results, on the quiet 2-core CPU)::

    python -m benchmarks.scale_clients --out benchmarks/results/scale_clients_cpu.jsonl

``--quick`` checks the script in a minute (small sizes; writes no file unless ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], times


# --- cases (each runs in a fresh process) ---


def case_partition(clients: int, per_client: int, ref_max: int) -> dict:
    import numpy as np

    from marsjax.data.partition import dirichlet_partition, pad_partition, sampled_partition

    labels = np.random.default_rng(0).integers(0, 10, 60000)
    t0 = time.perf_counter()
    p = dirichlet_partition(labels, clients, 0.9, seed=0, num_classes=10)
    rec = {"dirichlet_s": time.perf_counter() - t0, "max_len": int(p.indices.shape[1])}
    rec["indices_mb"] = p.indices.nbytes / 2**20
    rec["empty_clients"] = int(np.sum(p.counts == 0))
    if clients <= ref_max:  # the per-client-list construction the vectorised one replaced
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        lists = [[] for _ in range(clients)]
        for c in range(10):
            idx = np.flatnonzero(labels == c)
            rng.shuffle(idx)
            q = rng.dirichlet(np.full(clients, 0.9))
            cuts = np.rint(np.cumsum(q) / q.sum() * len(idx)).astype(np.int64)
            cuts[-1] = len(idx)
            for i, part in enumerate(np.split(idx, cuts[:-1])):
                lists[i].append(part)
        flat = [np.sort(np.concatenate(v)) for v in lists]
        ref = pad_partition(flat, labels, 10)
        rec["per_client_lists_s"] = time.perf_counter() - t0
        rec["same_as_per_client_lists"] = bool(np.array_equal(ref.indices, p.indices))
    del p
    t0 = time.perf_counter()
    s = sampled_partition(labels, clients, per_client, seed=0, num_classes=10)
    rec["sampled_s"] = time.perf_counter() - t0
    rec["sampled_indices_mb"] = s.indices.nbytes / 2**20
    return rec


def case_sampling(registered: int, clients: int, repeats: int) -> dict:
    import jax

    from marsjax.simulation import sample_clients

    a = clients // 5
    f = jax.jit(lambda k: sample_clients(k, registered, registered // 5, clients, a))
    t0 = time.perf_counter()
    jax.block_until_ready(f(jax.random.key(0)))
    compile_s = time.perf_counter() - t0
    keys = iter(range(1, 10**6))
    t, times = _timed(lambda: jax.block_until_ready(f(jax.random.key(next(keys)))), repeats)
    return {"sample_s": t, "sample_s_all": times, "compile_s": compile_s}


def case_round(
    registered: int,
    clients: int,
    chunk: int,
    width: str,
    defense: str,
    per_client: int,
    repeats: int,
) -> dict:
    import jax
    import numpy as np

    from marsjax import simulation
    from marsjax.config import (
        AttackConfig,
        DataConfig,
        DefenseConfig,
        ExperimentConfig,
        ModelConfig,
        RunConfig,
        TrainConfig,
    )
    from marsjax.data import load_dataset
    from marsjax.data.datasets import _META, Dataset

    if width == "small":
        ds = load_dataset("digits")
    else:  # the paper SimpleNet needs 28x28 inputs: MNIST-shaped random images
        num_classes, shape, mean, std = _META["mnist"]
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (20000, *shape), dtype=np.uint8)
        y = rng.integers(0, num_classes, 20000).astype(np.int32)
        ds = Dataset("mnist", x, y, x[:1000], y[:1000], num_classes, mean, std)
    cfg = ExperimentConfig(
        name=f"scale_{clients}",
        data=DataConfig(
            name=ds.name,
            num_clients=registered,
            partition="sampled",
            samples_per_client=per_client,
            server_samples=0,
        ),
        model=ModelConfig(name="simplenet", width=width, batch_norm=False),
        train=TrainConfig(lr=0.05, momentum=0.9, batch_size=per_client, local_epochs=1),
        attack=AttackConfig(
            name="badnets", num_attackers=registered // 5, attackers_per_round=clients // 5
        ),
        defense=DefenseConfig(name=defense),
        run=RunConfig(
            rounds=100,
            clients_per_round=clients,
            client_strategy="map",
            client_chunk=chunk,
            eval_every=100,
        ),
    )
    t0 = time.perf_counter()
    sim = simulation.build(cfg, ds)
    build_s = time.perf_counter() - t0
    state = sim.init_state()
    params = sum(int(x.size) for x in jax.tree.leaves(state.global_variables))
    rss_before = _rss_mb()
    t0 = time.perf_counter()
    state, m = sim.round_step(state, sim.data)
    jax.block_until_ready(state)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, m = sim.round_step(state, sim.data)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    t = sorted(times)[len(times) // 2]
    accepted = np.asarray(m["accepted"]) > 0
    mal = np.asarray(m["is_attacking"])
    return {
        "params": params,
        "build_s": build_s,
        "round_s": t,
        "round_s_all": times,
        "compile_s": max(first - t, 0.0),
        "clients_per_s": clients / t,
        "updates_mb": clients * params * 4 / 2**20,
        "rss_before_round_mb": rss_before,
        "traces": int(sim.traces["round"]),
        "tpr": float(np.mean(~accepted[mal])) if mal.any() else None,
        "fpr": float(np.mean(~accepted[~mal])),
        "finite": bool(
            all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.global_variables))
        ),
    }


def case_mars_select(n: int, length: int, clustering: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from marsjax.mars.defense import mars_select

    rng = np.random.default_rng(0)
    cbe = np.abs(rng.normal(1.0, 0.1, (n, length))).astype(np.float32)
    bad = n // 5
    cbe[:bad] += 0.5  # the attackers' energies sit higher
    cbe, valid = jnp.asarray(cbe), jnp.ones(n, bool)
    f = jax.jit(lambda c, v: mars_select(jax.random.key(0), c, v, 0.03, clustering=clustering))
    t0 = time.perf_counter()
    compiled = f.lower(cbe, valid).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(cbe, valid))
    t, times = _timed(lambda: jax.block_until_ready(compiled(cbe, valid)), repeats)
    acc = np.asarray(out.accepted)
    return {
        "select_s": t,
        "select_s_all": times,
        "compile_s": compile_s,
        "w1_matrix_mb": n * n * 4 / 2**20,
        "flagged_are_the_shifted_rows": bool(np.array_equal(np.flatnonzero(~acc), np.arange(bad))),
    }


CASES = {
    "partition": case_partition,
    "sampling": case_sampling,
    "round": case_round,
    "mars_select": case_mars_select,
}


def plan(args) -> list[dict]:
    q = args.quick
    reg = 20_000 if q else 1_000_000
    out = []
    for c in (1000, 10_000) if q else (10_000, 100_000, 1_000_000):
        out.append(
            {
                "case": "partition",
                "clients": c,
                "per_client": args.per_client,
                "ref_max": args.ref_max,
            }
        )
    for m in (100, 1000) if q else (100, 1000, 10_000):
        out.append({"case": "sampling", "registered": reg, "clients": m, "repeats": args.repeats})
    rounds = (
        [(100, 100, "small", "fedavg"), (1000, 1000, "small", "mars")]
        if q
        else [
            (100, 100, "small", "fedavg"),
            (1000, 100, "small", "fedavg"),
            (1000, 1000, "small", "fedavg"),
            (10_000, 1000, "small", "fedavg"),
            (10_000, 10_000, "small", "fedavg"),
            (10_000, 1000, "small", "mars"),
            (100, 100, "paper", "fedavg"),
            (1000, 100, "paper", "fedavg"),
            (1000, 100, "paper", "mars"),
        ]
    )
    for m, chunk, width, defense in rounds:
        out.append(
            {
                "case": "round",
                "registered": reg,
                "clients": m,
                "chunk": chunk,
                "width": width,
                "defense": defense,
                "per_client": args.per_client,
                "repeats": args.repeats,
            }
        )
    for clustering in ("code", "paper"):
        for n in (500, 1000) if q else (1000, 3000, 10_000):
            out.append(
                {
                    "case": "mars_select",
                    "n": n,
                    "length": 250,
                    "clustering": clustering,
                    "repeats": args.repeats,
                }
            )
    return out


def machine() -> dict:
    import platform

    import jax

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    from marsjax.provenance import git_state

    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        **git_state(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON lines file (appended)")
    p.add_argument("--quick", action="store_true", help="small sizes, check the script")
    p.add_argument("--per-client", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-max", type=int, default=100_000)
    p.add_argument("--only", default=None, help="comma-separated case names")
    p.add_argument("--case-json", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args(argv)
    if args.case_json:
        spec = json.loads(args.case_json)
        fn = CASES[spec.pop("case")]
        rec = fn(**spec)
        rec["peak_rss_mb"] = _peak_rss_mb()
        print("RESULT " + json.dumps(rec), flush=True)
        return 0
    info = machine()
    command = "python -m benchmarks.scale_clients " + " ".join(argv or sys.argv[1:])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    only = set(args.only.split(",")) if args.only else None
    for spec in plan(args):
        if only and spec["case"] not in only:
            continue
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.scale_clients", "--case-json", json.dumps(spec)],
            check=False,
            capture_output=True,
            text=True,
            cwd=ROOT.parent,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        rec = dict(spec)
        if proc.returncode == 0 and lines:
            rec.update(json.loads(lines[-1][len("RESULT ") :]))
        else:
            rec["error"] = (proc.stderr or proc.stdout)[-800:]
        rec.update(wall_s=time.perf_counter() - t0, **info, command=command, date=date)
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
