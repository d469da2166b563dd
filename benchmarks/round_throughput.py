"""Throughput of marsjax's compiled round against the PyTorch per-client loop, same machine.

Each case builds the real simulator (``marsjax.simulation.build``) on synthetic uint8 data of the
paper's shapes (MNIST-like 28x28x1 for SimpleNet, CIFAR-like 32x32x3 for ResNet-18), every client
holding ``samples_per_client`` samples, and times whole rounds: local training of every sampled
client (SGD lr 0.1, momentum 0.9, wd 5e-4, batch 64, 2 local epochs), the attack's crafting, the
defense and the aggregation. Compile time and steady state are measured separately (one warm-up
round, then the median of ``--repeats`` rounds, each ending in ``block_until_ready``). The
PyTorch reference (``benchmarks/baselines/torch_fl.py``: deepcopy per client, SGD, shuffled
mini-batches, the official code's structure) runs in the same process on the same device, and so
does the JAX per-client loop (``--jax-loop``: one ``jit``-ed single-client local training, called
once per client from Python, then the mean; what a direct port of the PyTorch loop does).
``--peak`` times a 2048^3 float32 ``jnp.matmul`` (the machine's dense peak for JAX) and adds, for
SimpleNet, ``flops_per_s`` (training FLOPs: 2 x multiply-adds of every layer, forward + backward)
and ``frac_peak``.

One JSON line per case goes to stdout and to ``--out`` (default
``benchmarks/results/round_throughput_<backend>.jsonl``)::

    python -m benchmarks.round_throughput --cases simplenet:100,simplenet:500 \
        --torch simplenet:100 --jax-loop simplenet:100 --peak

Fields: case, model, clients, samples_per_client, strategy, chunk, conv_impl, defense, backend,
device_kind, jax_version, round_s, compile_s, clients_per_s, samples_per_s (samples x epochs
per second, what the PyTorch loop reports too), peak memory (host RSS, device bytes), machine,
command, date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import resource
import sys
import time

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
from marsjax.data.datasets import _META, Dataset

MODELS = {
    # name -> (dataset name for shapes/normalisation, ModelConfig)
    "simplenet": ("fashion_mnist", ModelConfig(name="simplenet", batch_norm=True)),
    "simplenet_nobn": ("fashion_mnist", ModelConfig(name="simplenet", batch_norm=False)),
    "resnet18": ("cifar10", ModelConfig(name="resnet18", stem="cifar")),
}
TORCH_MODELS = {
    "simplenet": ("simplenet_bn", {}, (1, 28, 28)),
    "simplenet_nobn": ("simplenet", {}, (1, 28, 28)),
    "resnet18": ("resnet", {"widths": (64, 128, 256, 512)}, (3, 32, 32)),
}


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
    }


def synthetic(name: str, num_clients: int, per_client: int, seed: int = 0) -> Dataset:
    num_classes, shape, mean, std = _META[name]
    rng = np.random.default_rng(seed)
    n = num_clients * per_client
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = rng.integers(0, num_classes, n).astype(np.int32)
    return Dataset(name, x, y, x[:1000], y[:1000], num_classes, mean, std)


def config(
    model: str,
    clients: int,
    per_client: int,
    defense: str,
    strategy: str,
    chunk: int | None,
    conv_impl: str,
) -> tuple[ExperimentConfig, Dataset]:
    ds_name, mcfg = MODELS[model]
    ds = synthetic(ds_name, clients, per_client)
    cfg = ExperimentConfig(
        name=f"{model}_{clients}",
        data=DataConfig(name=ds_name, num_clients=clients, partition="iid", server_samples=0),
        model=dataclasses.replace(mcfg, conv_impl=conv_impl),
        train=TrainConfig(lr=0.1, momentum=0.9, weight_decay=5e-4, batch_size=64, local_epochs=2),
        attack=AttackConfig(
            name="badnets", num_attackers=clients // 5, attackers_per_round=clients // 5
        ),
        defense=DefenseConfig(name=defense),
        run=RunConfig(
            rounds=100,
            clients_per_round=clients,
            client_strategy=strategy,
            client_chunk=chunk,
            eval_every=100,
        ),
    )
    return cfg, ds


def device_peak_bytes() -> int | None:
    try:
        return int(jax.devices()[0].memory_stats()["peak_bytes_in_use"])
    except Exception:  # noqa: BLE001 - backends without memory stats
        return None


def bench_jax(
    model,
    clients,
    per_client,
    *,
    defense="fedavg",
    strategy="auto",
    chunk=None,
    conv_impl="auto",
    repeats=3,
) -> dict:
    cfg, ds = config(model, clients, per_client, defense, strategy, chunk, conv_impl)
    sim = simulation.build(cfg, ds)
    state = sim.init_state()
    t0 = time.perf_counter()
    state, _ = sim.round_step(state, sim.data)
    jax.block_until_ready(state)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        state, _ = sim.round_step(state, sim.data)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    epochs = cfg.train.local_epochs
    return {
        "impl": "marsjax",
        "strategy": simulation.default_client_strategy() if strategy == "auto" else strategy,
        "chunk": chunk,
        "conv_impl": conv_impl,
        "defense": defense,
        "round_s": t,
        "round_s_all": times,
        "compile_s": max(first - t, 0.0),
        "clients_per_s": clients / t,
        "samples_per_s": clients * per_client * epochs / t,
        "device_peak_bytes": device_peak_bytes(),
        "finite": bool(
            np.all(
                [np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.global_variables)]
            )
        ),
    }


def bench_jax_loop(model, clients, per_client, repeats=2) -> dict:
    """A Python loop over the clients of one ``jit``-ed single-client local training."""
    from marsjax.client import ClientData, make_local_train, make_normalize
    from marsjax.models import build_model

    cfg, ds = config(model, clients, per_client, "fedavg", "map", None, "auto")
    net = build_model(
        cfg.model.name,
        ds.num_classes,
        batch_norm=cfg.model.batch_norm,
        conv_impl=cfg.model.conv_impl,
        stem=cfg.model.stem,
    )
    t = cfg.train
    train = jax.jit(
        make_local_train(
            net,
            make_normalize(ds.mean, ds.std),
            lr=t.lr,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            batch_size=t.batch_size,
            epochs=t.local_epochs,
        )
    )
    idx = np.arange(clients * per_client, dtype=np.int32).reshape(clients, per_client)
    data = ClientData(
        jax.device_put(ds.x_train),
        jax.device_put(ds.y_train),
        jax.device_put(idx),
        jax.device_put(np.full(clients, per_client, np.int32)),
    )
    g = net.init(jax.random.key(0), jax.numpy.zeros((1, *ds.image_shape)), train=False)
    g = dict(g)
    mean = jax.jit(lambda vs: jax.tree.map(lambda *x: sum(x) / len(x), *vs))

    def one_round(g):
        out = [
            train(g, jax.random.key(c), data, data.indices[c], data.counts[c])[0]
            for c in range(clients)
        ]
        return mean(out)

    t0 = time.perf_counter()
    g = jax.block_until_ready(one_round(g))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        g = jax.block_until_ready(one_round(g))
        times.append(time.perf_counter() - t0)
    r = float(np.median(times))
    return {
        "impl": "jax_per_client_loop",
        "round_s": r,
        "round_s_all": times,
        "compile_s": max(first - r, 0.0),
        "clients_per_s": clients / r,
        "samples_per_s": clients * per_client * t.local_epochs / r,
    }


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> dict:
    """JAX's float32 dense matmul rate on this device (median and best of ``repeats``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jax.numpy.float32)
    f = jax.jit(jax.numpy.matmul)
    f(a, a).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    flops = 2.0 * n**3
    return {
        "peak_gflops": flops / float(np.median(ts)) / 1e9,
        "peak_gflops_max": flops / min(ts) / 1e9,
        "n": n,
    }


def bench_torch(model, clients, per_client, repeats=2) -> dict:
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    import torch

    from benchmarks.baselines import torch_fl

    name, kw, shape = TORCH_MODELS[model]
    r = torch_fl.time_round(
        name,
        clients,
        per_client,
        image_shape=shape,
        repeats=repeats,
        model_kwargs=kw,
        loader="tensor",
    )
    r.update({"impl": "pytorch_loop", "torch_version": torch.__version__})
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cases",
        default="simplenet:100",
        help="model:clients[:per_client[:strategy[:chunk[:conv_impl[:defense]]]]],...",
    )
    p.add_argument("--per-client", type=int, default=600)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--torch",
        default="",
        help="model:clients[:per_client],... PyTorch loop cases on the same device",
    )
    p.add_argument(
        "--jax-loop",
        default="",
        help="model:clients[:per_client],... JAX per-client jit loop cases",
    )
    p.add_argument("--peak", action="store_true", help="time JAX's dense matmul peak first")
    p.add_argument("--out", default=None)
    p.add_argument("--deadline-s", type=float, default=0, help="skip cases after this many s")
    args = p.parse_args(argv)
    info = machine()
    out = pathlib.Path(args.out or f"benchmarks/results/round_throughput_{info['backend']}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    common = {
        **info,
        "command": " ".join(["python -m benchmarks.round_throughput", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }

    def emit(rec):
        rec = {
            **common,
            **rec,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        line = json.dumps(rec)
        print(line, flush=True)
        with open(out, "a") as f:
            f.write(line + "\n")

    jobs = []
    for c in [c for c in args.cases.split(",") if c]:
        f = c.split(":") + [""] * 7
        jobs.append(
            (
                "jax",
                f[0],
                int(f[1]),
                int(f[2] or args.per_client),
                f[3] or "auto",
                int(f[4]) if f[4] else None,
                f[5] or "auto",
                f[6] or "fedavg",
            )
        )
    for kind, spec in (("torch", args.torch), ("jaxloop", args.jax_loop)):
        for c in [c for c in spec.split(",") if c]:
            f = c.split(":") + [""] * 2
            jobs.append((kind, f[0], int(f[1]), int(f[2] or args.per_client)))
    peak = None
    if args.peak:
        peak = matmul_peak_gflops()
        emit({"case": "matmul_peak_2048", **peak})
    for job in jobs:
        if args.deadline_s and time.perf_counter() - start > args.deadline_s:
            emit({"case": ":".join(map(str, job[1:])), "skipped": "deadline"})
            continue
        kind, model, clients, per_client = job[:4]
        case = {
            "case": f"{kind}:{model}:{clients}",
            "model": model,
            "clients": clients,
            "samples_per_client": per_client,
            "epochs": 2,
            "batch_size": 64,
        }
        try:
            if kind == "jax":
                strategy, chunk, conv, defense = job[4:]
                r = bench_jax(
                    model,
                    clients,
                    per_client,
                    defense=defense,
                    strategy=strategy,
                    chunk=chunk,
                    conv_impl=conv,
                    repeats=args.repeats,
                )
            elif kind == "jaxloop":
                r = bench_jax_loop(model, clients, per_client, repeats=max(1, args.repeats - 1))
            else:
                r = bench_torch(model, clients, per_client, repeats=max(1, args.repeats - 1))
            if model.startswith("simplenet") and "samples_per_s" in r:
                from benchmarks.conv_impl import simplenet_flops_per_sample

                r["flops_per_sample"] = simplenet_flops_per_sample()
                r["flops_per_s"] = r["flops_per_sample"] * r["samples_per_s"]
                if peak is not None:
                    r["frac_peak"] = r["flops_per_s"] / 1e9 / peak["peak_gflops"]
            emit({**case, **r})
        except Exception as e:  # noqa: BLE001 - a case that does not fit must not lose the others
            emit({**case, "error": f"{type(e).__name__}: {str(e)[:500]}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
