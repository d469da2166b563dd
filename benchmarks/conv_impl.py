"""Convolution implementation x client strategy: local-training throughput, JAX vs PyTorch.

Times the local training of a federated round (every client: SGD lr 0.1, momentum 0.9, weight
decay 5e-4, batch 64, ``--epochs`` local epochs over its own ``--samples`` samples, starting from
the same global model) for the paper's MNIST ``SimpleNet`` (with and without BatchNorm), per
convolution implementation of :mod:`marsjax.models.layers` and per way of running the clients:

* ``map``: one ``jit`` of ``lax.map`` over the clients (one program, clients in sequence);
* ``map:K``: ``lax.map(..., batch_size=K)`` (``K`` clients ``vmap``-ed at a time);
* ``vmap``: one ``jit`` of ``vmap`` over all clients;
* ``loop``: a Python loop over the clients of a ``jit``-ed single-client function;
* ``shard``: ``shard_map`` over ``--devices`` fake CPU devices, each running its clients with
  ``lax.map`` (``XLA_FLAGS=--xla_force_host_platform_device_count``).

and, in the same run, the PyTorch per-client loop of ``benchmarks/baselines/torch_fl.py`` (the
official MARS / backdoors101 way) and a 2048^3 float32 matrix product in JAX and in PyTorch (the
machine's dense peak). Every case runs in its own subprocess (clean compile cache and peak RSS);
the XLA flags and fake-device count of a case are set before it imports JAX.

Prints one JSON line per case and appends them to ``--out``. Each line holds: ``case``,
``backend``, ``device_kind``, ``jax_version``, ``torch_version``, ``samples_per_s`` (real samples x
epochs per second of steady-state round time, median of ``--repeats``), ``clients_per_s``,
``compile_s``, ``peak_rss_mb``, ``flops_per_s`` (model FLOPs: 2 x multiply-adds of every conv and
dense layer, forward + backward, no input gradient for the first layer), ``frac_peak_jax`` and
``frac_peak_torch`` (of the matmul peaks measured in the same run), ``loadavg``,
``other_cpu_frac`` (share of the machine's CPU time used by other processes while the case was
timed: the noise indicator), the command line, CPU model and date.

Last results (2026-11-26; files under ``benchmarks/results/``; samples/s of local training):

* H100 (``conv_impl_gpu.jsonl``, 100 clients x 600 samples x 2 epochs): SimpleNet ``im2col`` +
  ``vmap`` 1,190,453; ``xla`` + ``vmap`` 429,329; ``im2col`` + ``map`` 517,724; PyTorch
  per-client loop on the GPU 28,196.
* 2 cores of a Xeon, pinned, idle otherwise (``conv_impl_cpu_xeon2.jsonl``, 10 clients):
  ``im2col`` + ``shard`` 4,005, + ``map`` 3,925, + ``vmap`` 2,657; PyTorch loop 3,401-3,705.
* 2-core AMD EPYC (``conv_impl_cpu.jsonl``): other processes used 65-90 % of the CPU throughout;
  in ``--paired`` rounds ``im2col`` was 1.14-1.18x ``im2col_flat``, 4x ``patches``, 12-16x
  ``xla``; PyTorch's OpenMP loop collapses under that load (60-200 samples/s) while XLA degrades
  in proportion (1,100-3,300).

Usage (a few minutes)::

    python benchmarks/conv_impl.py --out benchmarks/results/conv_impl_cpu.jsonl
    python benchmarks/conv_impl.py --impls xla --strategies map,vmap --clients 4   # slow ones
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MEAN, STD = 0.1307, 0.3081  # MNIST normalisation (as backdoors101)
RESNET_SMALL_WIDTHS = (16, 32, 64, 128)  # "resnet_small": ResNet-18 layout at 1/4 width, 32x32x3


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    try:
        with open("/proc/stat") as fh:
            f = fh.readline().split()[1:]
    except OSError:
        return 0, 0
    v = [int(t) for t in f]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def _own_times() -> int:
    try:
        with open("/proc/self/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except OSError:
        return 0


class Interference:
    """Share of the machine's CPU time that other processes used while timing."""

    def __enter__(self):
        self.b0, self.t0 = _cpu_times()
        self.o0 = _own_times()
        return self

    def __exit__(self, *exc):
        b1, t1 = _cpu_times()
        o1 = _own_times()
        dt = max(t1 - self.t0, 1)
        self.other_cpu_frac = max((b1 - self.b0) - (o1 - self.o0), 0) / dt
        return False


def wait_quiet(max_wait_s: float, busy_below: float = 0.1, window_s: float = 3.0) -> float:
    """Waits (up to ``max_wait_s``) until the machine's busy share over ``window_s`` drops below
    ``busy_below``; returns the last busy share seen (this process is idle meanwhile)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0, t0 = _cpu_times()
        time.sleep(window_s)
        b1, t1 = _cpu_times()
        busy = (b1 - b0) / max(t1 - t0, 1)
        if busy < busy_below or time.monotonic() > deadline:
            return busy


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def simplenet_flops_per_sample(h: int = 28, w: int = 28, num_classes: int = 10) -> float:
    """Training FLOPs per sample of SimpleNet: 2 x MACs, fwd + bwd (no input grad for conv1)."""
    h1, w1 = h - 4, w - 4  # conv1 5x5 valid
    c1 = h1 * w1 * 20 * 25 * 1
    h2, w2 = h1 // 2 - 4, w1 // 2 - 4  # pool, conv2 5x5 valid
    c2 = h2 * w2 * 50 * 25 * 20
    f1 = (h2 // 2) * (w2 // 2) * 50 * 500
    f2 = 500 * num_classes
    macs_fwd = c1 + c2 + f1 + f2
    # backward: grad w.r.t. weights for every layer, w.r.t. inputs for all but conv1.
    macs_bwd = c1 + 2 * (c2 + f1 + f2)
    return 2.0 * (macs_fwd + macs_bwd)


# --------------------------------------------------------------------------------------------
# The JAX local training (the function recommended for marsjax/client.py)
# --------------------------------------------------------------------------------------------


def make_local_train(
    model, *, batch_size, epochs, max_len, lr=0.1, momentum=0.9, wd=5e-4, has_bn=None
):
    """``train(params, batch_stats, key, x_u8, y, idx, count) -> (update, batch_stats)``.

    One client. ``idx`` ``[max_len]`` int32 indexes the uint8 data set on the device and
    ``count`` says how many are real. Each epoch visits the client's samples in a fresh random order
    (all epochs' orders are drawn up front with one batched ``argsort``); the last batch of an
    epoch wraps around to the start of the order, so every batch is full. A single
    ``lax.while_loop`` runs ``epochs * ceil(count / batch_size)`` steps (a per-client trip count:
    under ``lax.map`` a small client really runs fewer steps).
    """
    import jax
    import jax.numpy as jnp
    import optax

    tx = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=momentum))
    if has_bn is None:
        has_bn = bool(getattr(model, "batch_norm", False))

    def loss_fn(params, batch_stats, x, y):
        x = (x.astype(jnp.float32) * (1.0 / 255.0) - MEAN) * (1.0 / STD)
        if has_bn:
            logits, new = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            bs = new["batch_stats"]
        else:
            logits, bs = model.apply({"params": params}, x), batch_stats
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, bs

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def train(params, batch_stats, key, x_u8, y_all, idx, count):
        count = jnp.asarray(count, jnp.int32)
        per_epoch = (count + batch_size - 1) // batch_size
        total = per_epoch * epochs
        safe = jnp.maximum(count, 1)
        noise = jax.random.uniform(key, (epochs, max_len))
        noise = jnp.where(jnp.arange(max_len) < count, noise, 2.0)
        orders = idx[jnp.argsort(noise, axis=-1)]  # [epochs, max_len] data-set indices

        def body(carry):
            s, p, bs, o = carry
            e = s // jnp.maximum(per_epoch, 1)
            b = s - e * per_epoch
            pos = (b * batch_size + jnp.arange(batch_size)) % safe
            sample = orders[e][pos]
            g, bs = grad_fn(p, bs, x_u8[sample], y_all[sample])
            u, o = tx.update(g, o, p)
            return s + 1, optax.apply_updates(p, u), bs, o

        carry = (jnp.int32(0), params, batch_stats, tx.init(params))
        _, p, bs, _ = jax.lax.while_loop(lambda c: c[0] < total, body, carry)
        return jax.tree.map(jnp.subtract, p, params), bs

    return train


# --------------------------------------------------------------------------------------------
# Case runners (each in its own subprocess)
# --------------------------------------------------------------------------------------------


def _timeit(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run_peak(case: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    n = case.get("n", 2048)
    flops = 2.0 * n**3
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    with Interference() as itf:
        tj = _timeit(lambda: f(a, b).block_until_ready(), 10)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    ta_, tb_ = torch.randn(n, n, device=dev), torch.randn(n, n, device=dev)
    for _ in range(3):
        ta_ @ tb_
    sync()

    def tmm():
        ta_ @ tb_
        sync()

    tt = _timeit(tmm, 10)
    return {
        "peak_gflops_jax": flops / float(np.median(tj)) / 1e9,
        "peak_gflops_torch": flops / float(np.median(tt)) / 1e9,
        "peak_gflops_jax_max": flops / min(tj) / 1e9,
        "peak_gflops_torch_max": flops / min(tt) / 1e9,
        "torch_num_threads": torch.get_num_threads(),
        "other_cpu_frac": itf.other_cpu_frac,
    }


def run_torch(case: dict) -> dict:
    sys.path.insert(0, str(HERE / "baselines"))
    import torch
    import torch_fl

    with Interference() as itf:
        resnet = case["model"] == "resnet_small"
        r = torch_fl.time_round(
            "resnet" if resnet else case["model"],
            case["clients"],
            case["samples"],
            image_shape=(3, 32, 32) if resnet else (1, 28, 28),
            model_kwargs={"widths": RESNET_SMALL_WIDTHS} if resnet else None,
            repeats=case["repeats"],
            epochs=case["epochs"],
            batch_size=case["batch"],
            loader=case.get("loader", "tensor"),
        )
    r.update(other_cpu_frac=itf.other_cpu_frac, torch_version=torch.__version__)
    return r


def run_jax(case: dict) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from marsjax.models.cnn import SimpleNet
    from marsjax.models.resnet import ResNet18

    clients, samples, epochs = case["clients"], case["samples"], case["epochs"]
    batch, strategy = case["batch"], case["strategy"]
    if case["model"] == "resnet_small":
        model = ResNet18(10, "cifar", case["impl"], widths=RESNET_SMALL_WIDTHS)
        shape = (32, 32, 3)
    else:
        model = SimpleNet(batch_norm=case["model"] == "simplenet_bn", conv_impl=case["impl"])
        shape = (28, 28, 1)
    rng = np.random.default_rng(0)
    n = clients * samples
    x_u8 = jnp.asarray(rng.integers(0, 256, (n, *shape), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, 10, n).astype(np.int32))
    idx = jnp.asarray(np.arange(n, dtype=np.int32).reshape(clients, samples))
    counts = jnp.full((clients,), samples, jnp.int32)
    keys = jax.random.split(jax.random.key(1), clients)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *shape), jnp.float32))
    params, bstats = variables["params"], variables.get("batch_stats", {})
    train = make_local_train(
        model, batch_size=batch, epochs=epochs, max_len=samples, has_bn="batch_stats" in variables
    )

    # The global model and the data are arguments (not constants) so XLA cannot fold them.
    def round_map(p, bs, xs, ys, ks, ii, cc, chunk=None):
        def one(a):
            k, i, c = a
            return train(p, bs, k, xs, ys, i, c)

        return jax.lax.map(one, (ks, ii, cc), batch_size=chunk)

    def round_vmap(p, bs, xs, ys, ks, ii, cc):
        return jax.vmap(train, in_axes=(None, None, 0, None, None, 0, 0))(p, bs, ks, xs, ys, ii, cc)

    args = (params, bstats, x_u8, y, keys, idx, counts)
    if strategy == "map":
        fn = jax.jit(round_map)
    elif strategy.startswith("map:"):
        k = int(strategy.split(":")[1])
        fn = jax.jit(lambda *a: round_map(*a, chunk=k))
    elif strategy == "vmap":
        fn = jax.jit(round_vmap)
    elif strategy == "shard":
        mesh = Mesh(np.array(jax.devices()), ("clients",))
        rep = P()
        cl = P("clients")
        fn = jax.jit(
            jax.shard_map(
                round_map,
                mesh=mesh,
                in_specs=(rep, rep, rep, rep, cl, cl, cl),
                out_specs=cl,
                check_vma=False,
            )
        )
    elif strategy == "loop":
        one_jit = jax.jit(train)

        def fn_loop(p, bs, xs, ys, ks, ii, cc):
            outs = [one_jit(p, bs, ks[c], xs, ys, ii[c], cc[c]) for c in range(clients)]
            return outs

        t0 = time.perf_counter()
        jax.block_until_ready(one_jit(params, bstats, keys[0], x_u8, y, idx[0], counts[0]))
        compile_s = time.perf_counter() - t0
        run = lambda: jax.block_until_ready(fn_loop(*args))
        run()
        with Interference() as itf:
            times = _timeit(run, case["repeats"])
        return _jax_result(case, compile_s, times, itf)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")

    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    run = lambda: jax.block_until_ready(compiled(*args))
    run()  # warm-up
    with Interference() as itf:
        times = _timeit(run, case["repeats"])
    return _jax_result(case, compile_s, times, itf)


def _jax_result(case, compile_s, times, itf):
    import jax

    t = float(np.median(times))
    real = case["clients"] * case["samples"] * case["epochs"]
    return {
        "compile_s": compile_s,
        "round_s": t,
        "round_s_all": times,
        "samples_per_s": real / t,
        "samples_per_s_best": real / min(times),
        "clients_per_s": case["clients"] / t,
        "other_cpu_frac": itf.other_cpu_frac,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
    }


def run_paired(case: dict) -> dict:
    """One client's local training per (model, impl) and the PyTorch loop, timed interleaved.

    Round ``r`` times every variant once, back to back, so all variants see the same background
    load; ``ratio_vs_*`` is the median over rounds of the per-round time ratio (robust on a shared
    machine, where absolute numbers drift).
    """
    import jax
    import jax.numpy as jnp
    import torch

    sys.path.insert(0, str(HERE / "baselines"))
    import torch_fl

    from marsjax.models.cnn import SimpleNet

    samples, epochs, batch = case["samples"], case["epochs"], case["batch"]
    rng = np.random.default_rng(0)
    x_u8 = jnp.asarray(rng.integers(0, 256, (samples, 28, 28, 1), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, 10, samples).astype(np.int32))
    idx = jnp.arange(samples, dtype=jnp.int32)
    fns, compile_s = {}, {}
    for m in case["models"]:
        for impl in case["impls"]:
            model = SimpleNet(batch_norm=m == "simplenet_bn", conv_impl=impl)
            v = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
            train = make_local_train(model, batch_size=batch, epochs=epochs, max_len=samples)
            a = (v["params"], v.get("batch_stats", {}), jax.random.key(1), x_u8, y, idx, samples)
            t0 = time.perf_counter()
            c = jax.jit(train).lower(*a).compile()
            compile_s[f"jax/{m}/{impl}"] = time.perf_counter() - t0
            fns[f"jax/{m}/{impl}"] = lambda c=c, a=a: jax.block_until_ready(c(*a))
        tx = torch.from_numpy(rng.standard_normal((samples, 1, 28, 28), dtype=np.float32))
        ty = torch.from_numpy(rng.integers(0, 10, samples)).long()
        tmodel = torch_fl.make_model(m)
        tidx = np.arange(samples)
        fns[f"torch/{m}"] = lambda tm=tmodel, tx=tx, ty=ty, ti=tidx: torch_fl.local_train(
            tm, tx, ty, ti, epochs=epochs, batch_size=batch
        )
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    with Interference() as itf:
        for _ in range(case["rounds"]):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    real = samples * epochs
    out = {"other_cpu_frac": itf.other_cpu_frac, "torch_num_threads": torch.get_num_threads()}
    variants = {}
    for k, ts in times.items():
        m = k.split("/")[1]
        ref_j = times[f"jax/{m}/{case['impls'][0]}"]
        ref_t = times[f"torch/{m}"]
        variants[k] = {
            "samples_per_s": real / float(np.median(ts)),
            "samples_per_s_best": real / min(ts),
            f"ratio_vs_{case['impls'][0]}": float(np.median(np.array(ref_j) / np.array(ts))),
            "ratio_vs_torch": float(np.median(np.array(ref_t) / np.array(ts))),
            "compile_s": compile_s.get(k),
        }
    out["variants"] = variants
    return out


def run_case(case: dict) -> dict:
    kind = case["kind"]
    if kind == "paired":
        out = run_paired(case)
    elif kind == "peak":
        out = run_peak(case)
    elif kind == "torch":
        out = run_torch(case)
    elif kind == "jax":
        out = run_jax(case)
    else:
        raise ValueError(kind)
    out["peak_rss_mb"] = _peak_rss_mb()
    try:
        import jax

        out.setdefault("jax_version", jax.__version__)
        out.setdefault("backend", jax.default_backend())
        out.setdefault("device_kind", jax.devices()[0].device_kind)
    except ImportError:
        pass
    return out


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


def _spawn(case: dict, xla_flags: str, timeout: float) -> dict:
    env = dict(os.environ)
    flags = xla_flags
    if case.get("devices", 1) > 1:
        flags = f"{flags} --xla_force_host_platform_device_count={case['devices']}"
    if flags.strip():
        env["XLA_FLAGS"] = flags.strip()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", json.dumps(case)]
    try:
        p = subprocess.run(
            cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"error": (p.stderr or p.stdout)[-2000:]}
    out = json.loads(lines[-1])
    out["xla_flags"] = flags.strip()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="simplenet,simplenet_bn")
    ap.add_argument("--impls", default="im2col,im2col_flat")
    ap.add_argument("--strategies", default="map,map:2,vmap,loop,shard")
    ap.add_argument("--devices", type=int, default=2, help="fake CPU devices for 'shard'")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--samples", type=int, default=600, help="samples per client")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch", default="tensor", help="torch loaders to time ('' for none)")
    ap.add_argument("--torch-clients", type=int, default=None)
    ap.add_argument(
        "--xla-flags",
        action="append",
        default=None,
        help="extra XLA_FLAGS for the JAX cases; repeat it to time every JAX case once per value,"
        " side by side in the same run (write --xla-flags=VALUE; an empty value is the default flags;"
        " --paired uses the first)",
    )
    ap.add_argument("--no-peak", action="store_true")
    ap.add_argument("--peak-n", type=int, default=2048, help="size of the peak matmul")
    ap.add_argument("--timeout", type=float, default=600.0, help="per case, seconds")
    ap.add_argument(
        "--paired",
        type=int,
        default=0,
        help="instead of the grid: N interleaved rounds of one client per model x impl + torch",
    )
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each case wait up to this many seconds for other processes to go idle",
    )
    args = ap.parse_args(argv)
    flag_variants = args.xla_flags or [""]

    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    common = {
        "command": shlex.join(["python", "benchmarks/conv_impl.py", *(argv or sys.argv[1:])]),
        "cpu_model": _cpu_model(),
        "num_cpus": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hostname_kind": platform.machine(),
    }
    from marsjax.provenance import git_state  # the code's commit and whether the tree was dirty

    common.update(git_state())
    try:
        import torch

        common["torch_version"] = torch.__version__
    except ImportError:
        pass
    base = {
        "samples": args.samples,
        "epochs": args.epochs,
        "batch": args.batch,
        "repeats": args.repeats,
    }
    flops = simplenet_flops_per_sample()
    out_f = open(args.out, "a") if args.out else None  # noqa: SIM115
    peaks: dict = {}

    def emit(name: str, case: dict, xla_flags: str = ""):
        busy_before = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
        load_before = list(os.getloadavg())
        res = _spawn(case, xla_flags, args.timeout)
        rec = {"case": name, **common, **case, **res}
        rec.update(loadavg_before=load_before, loadavg=list(os.getloadavg()))
        if busy_before is not None:
            rec["busy_before"] = busy_before
        rec.pop("kind", None)
        if "samples_per_s" in res and case.get("model", "").startswith("simplenet"):
            rec["flops_per_sample"] = flops
            rec["flops_per_s"] = flops * res["samples_per_s"]
            for k in ("jax", "torch"):
                if f"peak_gflops_{k}" in peaks:
                    rec[f"frac_peak_{k}"] = rec["flops_per_s"] / 1e9 / peaks[f"peak_gflops_{k}"]
        line = json.dumps(rec)
        print(line, flush=True)
        if out_f:
            out_f.write(line + "\n")
            out_f.flush()
        return res

    if args.paired:
        if not args.no_peak:
            peaks.update(emit(f"matmul_peak_{args.peak_n}", {"kind": "peak", "n": args.peak_n}))
        case = {
            "kind": "paired",
            "models": args.models.split(","),
            "impls": args.impls.split(","),
            "rounds": args.paired,
            **base,
        }
        res = _spawn(case, flag_variants[0], args.timeout)
        for name, v in res.pop("variants", {}).items():
            rec = {
                "case": f"paired/{name}",
                **common,
                **{k: c for k, c in case.items() if k != "kind"},
            }
            rec.update(res, **v, loadavg=list(os.getloadavg()))
            if name.startswith("jax"):
                rec["flops_per_sample"] = flops
                rec["flops_per_s"] = flops * v["samples_per_s"]
                for k in ("jax", "torch"):
                    if f"peak_gflops_{k}" in peaks:
                        rec[f"frac_peak_{k}"] = rec["flops_per_s"] / 1e9 / peaks[f"peak_gflops_{k}"]
            line = json.dumps(rec)
            print(line, flush=True)
            if out_f:
                out_f.write(line + "\n")
        if "error" in res:
            print(json.dumps(res))
        if out_f:
            out_f.close()
        return

    if not args.no_peak:
        n = args.peak_n
        peaks.update(emit(f"matmul_peak_{n}", {"kind": "peak", "n": n}))
    models = [m for m in args.models.split(",") if m]
    loaders = [t for t in args.torch.split(",") if t]
    tclients = args.torch_clients or args.clients

    def torch_cases(tag):
        for m in models:
            for ld in loaders:
                case = {"kind": "torch", "model": m, "loader": ld, "clients": tclients, **base}
                emit(f"torch_{ld}/{m}/{tag}", case)

    torch_cases("before")
    for m in models:
        for impl in [i for i in args.impls.split(",") if i]:
            for strat in [s for s in args.strategies.split(",") if s]:
                devices = args.devices if strat == "shard" else 1
                clients = args.clients
                if strat.startswith("map:"):
                    k = int(strat.split(":")[1])
                    clients = max(k, clients // k * k)
                if strat == "shard":
                    clients = max(devices, clients // devices * devices)
                case = {
                    "kind": "jax",
                    "model": m,
                    "impl": impl,
                    "strategy": strat,
                    "devices": devices,
                    "clients": clients,
                    **base,
                }
                for flags in flag_variants:
                    tag = f" [{flags}]" if len(flag_variants) > 1 and flags else ""
                    emit(f"jax/{m}/{impl}/{strat}{tag}", case, flags)
    torch_cases("after")
    if out_f:
        out_f.close()


if __name__ == "__main__":
    main()
