"""Cost of one defense round (``defense.apply`` under ``jax.jit``), per registered defense.

Each case stacks ``clients`` random updates with the variables of a real model (the paper's
SimpleNet with BatchNorm, 28x28x1, 431k values; or ResNet-18 with the CIFAR stem, 32x32x3, 11.2M
values) -- the 20% attackers get a shifted update so that clustering defenses see structure -- and
times ``apply`` alone: compile (lower + compile) and steady state (one warm-up call, then the
median of ``--repeats`` calls, each ending in ``block_until_ready``). Defenses that run the model
(DeepSight, BackdoorIndicator, FLTrust) get 100 synthetic server samples; stateful ones start from
``init``; FoolsGold and FLDetector get ``client_ids``.

Every case runs in its own subprocess, so ``peak_rss_mb`` (``ru_maxrss``) is that case's, and a
case that runs out of memory or time is recorded as failed instead of ending the sweep. One JSON
line per case goes to stdout and to ``--out`` (default
``benchmarks/results/defense_cost_<backend>.jsonl``)::

    python -m benchmarks.bench_defenses --models simplenet,resnet18 --clients 20,100

Fields: case, defense, model, clients, num_params, options, backend, device_kind, jax_version,
seconds_per_round (wall), cpu_seconds_per_round (process CPU time, all threads: less sensitive to
other jobs on a shared machine), warmup_s, compile_s, repeats, peak_rss_mb, status, machine,
load_avg (1-minute load when the case ended), command, date.

Options that differ from the defaults are recorded per case: on a CPU, DeepSight's 3 x 20,000
random inputs per client and BackdoorIndicator's 50-epoch implant are too costly for ResNet-18
(and DeepSight for SimpleNet at 100 clients), so those cases run reduced settings; their cost is
linear in ``num_seeds * num_samples`` (DeepSight's forward passes) and in ``epochs`` and
``num_ood`` (the indicator's implant and checks).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

MODELS = {
    # name -> (image shape, build_model kwargs)
    "simplenet": ((28, 28, 1), {"name": "simplenet", "batch_norm": True}),
    "resnet18": ((32, 32, 3), {"name": "resnet18", "stem": "cifar"}),
}

# Reduced settings for cases that would take too long on a CPU (see the module docstring).
CPU_OPTIONS = {
    ("deepsight", "simplenet"): {"num_samples": 1000},
    ("deepsight", "resnet18"): {"num_seeds": 1, "num_samples": 50, "batch_size": 50},
    ("indicator", "resnet18"): {"epochs": 1, "num_ood": 64},
}


def machine() -> dict:
    import jax

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from marsjax.provenance import git_state

    dev = jax.devices()[0]
    return {
        **git_state(),  # commit, dirty
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
    }


def run_case(defense: str, model_name: str, clients: int, repeats: int, options: dict) -> dict:
    """Times one case in this process; returns its JSON record."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from marsjax import defenses
    from marsjax.client import make_normalize
    from marsjax.config import TrainConfig
    from marsjax.models import build_model

    shape, kw = MODELS[model_name]
    kw = dict(kw)
    model = build_model(kw.pop("name"), 10, **kw)
    norm = make_normalize((0.5,) * shape[-1], (0.25,) * shape[-1])
    rng = np.random.default_rng(0)
    server = (rng.integers(0, 256, (100, *shape), dtype=np.uint8), rng.integers(0, 10, 100))
    attackers = clients // 5
    ctx = defenses.DefenseContext(
        model=model,
        num_clients=clients,
        clients_per_round=clients,
        attackers_per_round=attackers,
        num_classes=10,
        image_shape=shape,
        normalize=norm,
        server_rule="mean",
        server_lr=1.0,
        eta=0.8,
        train=TrainConfig(),
        server_data=(server[0], server[1].astype(np.int32)),
    )
    g = model.init(jax.random.key(0), jnp.zeros((1, *shape), jnp.float32))
    num_params = int(sum(x.size for x in jax.tree.leaves(g)))
    d = defenses.make(defense, ctx, **options)

    @jax.jit
    def make_updates(key):
        leaves, treedef = jax.tree.flatten(g)
        keys = jax.random.split(key, len(leaves))
        out = []
        for k, leaf in zip(keys, leaves):
            u = 0.01 * jax.random.normal(k, (clients, *leaf.shape), jnp.float32)
            shift = jnp.where(jnp.arange(clients) < attackers, 0.05, 0.0)
            out.append(u + shift.reshape((-1,) + (1,) * leaf.ndim))
        return jax.tree.unflatten(treedef, out)

    updates = jax.block_until_ready(make_updates(jax.random.key(1)))
    weights = jnp.ones((clients,), jnp.float32)
    state = d.init(g)
    extra = {"client_ids": jnp.arange(clients, dtype=jnp.int32)}
    key = jax.random.key(2)

    fn = jax.jit(d.apply)
    t0 = time.perf_counter()
    compiled = fn.lower(
        key, updates, state, global_variables=g, client_weights=weights, **extra
    ).compile()
    compile_s = time.perf_counter() - t0

    def once():
        t, c = time.perf_counter(), time.process_time()
        out = compiled(key, updates, state, global_variables=g, client_weights=weights, **extra)
        jax.block_until_ready(out)
        return time.perf_counter() - t, time.process_time() - c

    warm = once()[0]
    n = repeats if warm < 30 else 1
    times, cpu = zip(*[once() for _ in range(n)])
    mem = {}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:  # accelerators: cumulative over the process
        mem = {"device_peak_mb_so_far": stats["peak_bytes_in_use"] / 2**20}
    return {
        **mem,
        "num_params": num_params,
        "seconds_per_round": float(np.median(times)),
        "cpu_seconds_per_round": float(np.median(cpu)),
        "warmup_s": warm,
        "compile_s": compile_s,
        "repeats": n,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "status": "ok",
    }


def _in_process(name, model_name, clients, repeats, options) -> dict:
    import gc

    import jax

    try:
        rec = run_case(name, model_name, clients, repeats, options)
    except Exception as e:  # noqa: BLE001 - record the failure and go on
        rec = {"status": f"failed: {type(e).__name__}: {str(e)[:200]}"}
    jax.clear_caches()
    gc.collect()
    return rec


def _in_subprocess(cmd, timeout) -> dict:
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: timeout after {timeout} s"}
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    tail = (proc.stderr or "").strip().splitlines()[-1:] or [""]
    why = "killed (out of memory?)" if proc.returncode < 0 else tail[0][:200]
    return {"status": f"failed: rc={proc.returncode} {why}"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--defenses", default=None, help="comma list (default: the whole registry)")
    p.add_argument("--models", default="simplenet,resnet18")
    p.add_argument("--clients", default="20,100")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--inprocess",
        action="store_true",
        help="run the cases in this process (accelerators: no per-case start-up; RSS cumulative)",
    )
    p.add_argument(
        "--set",
        default="{}",
        help='per-defense option overrides, JSON: {"deepsight": {"num_samples": 2000}}',
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # defense:model:clients
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:  # child process: one case, JSON on the last line of stdout
        defense, model_name, clients = args.one.split(":")
        rec = run_case(defense, model_name, int(clients), args.repeats, json.loads(args.options))
        print(json.dumps(rec))
        return

    import jax

    from marsjax import defenses

    names = args.defenses.split(",") if args.defenses else sorted(defenses.REGISTRY)
    info = machine()
    backend = info["backend"]
    out = pathlib.Path(args.out or f"benchmarks/results/defense_cost_{backend}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    del jax
    for model_name in args.models.split(","):
        for clients in [int(c) for c in args.clients.split(",")]:
            for name in names:
                options = CPU_OPTIONS.get((name, model_name), {}) if backend == "cpu" else {}
                options = {**options, **json.loads(args.set).get(name, {})}
                t0 = time.time()
                if args.inprocess:
                    rec = _in_process(name, model_name, clients, args.repeats, options)
                else:
                    cmd = [
                        sys.executable,
                        "-m",
                        "benchmarks.bench_defenses",
                        "--one",
                        f"{name}:{model_name}:{clients}",
                        "--repeats",
                        str(args.repeats),
                        "--options",
                        json.dumps(options),
                    ]
                    rec = _in_subprocess(cmd, args.timeout)
                rec = {
                    "case": f"{name}/{model_name}/{clients}",
                    "defense": name,
                    "model": model_name,
                    "clients": clients,
                    "options": options,
                    **rec,
                    "backend": backend,
                    "device_kind": info["device_kind"],
                    "jax_version": info["jax_version"],
                    "wall_s": round(time.time() - t0, 1),
                    "load_avg": os.getloadavg()[0],
                    "machine": info,
                    "command": " ".join(
                        ["python", "-m", "benchmarks.bench_defenses", *sys.argv[1:]]
                    ),
                    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                }
                line = json.dumps(rec)
                print(line, flush=True)
                with out.open("a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
