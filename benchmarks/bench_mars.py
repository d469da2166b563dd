"""MARS's cost per round: marsjax vs a reference with the official code's structure.

MARS (Wan et al., NeurIPS 2025, arXiv:2509.20383). Issue #3, acceptance 6.

Setup. ResNet-18 with the ImageNet stem (the official CIFAR-10 configuration), 10 classes. The
global model is random (He-normal kernels, BatchNorm gains and running variances drawn from
U(0.5, 1.5)); client ``i``'s update mixes two of 8 pre-drawn noise tensors with client-specific
coefficients (every client distinct, cheap to generate), and the first 20% of the clients are
attackers whose update amplifies 16 channels of ``layer4`` convolutions (x3 their global kernel).
MARS reads only the conv kernels and the BatchNorm scales and running variances (11.2M of ResNet-
18's 11.7M parameters), so only those are generated and fed: 1000 full float32 client models would
need 45 GB, more than the machine's 24 GB. Clients are processed in chunks of ``--chunk``: each
chunk is generated on the host (untimed), moved to the device (untimed), and its CBE rows computed
by one compiled call (timed, ``block_until_ready``); then one compiled call clusters the ``[N, 250]``
CBE matrix and selects (timed: median of ``--reps``). Compile times are reported separately. The
weighted mean of the accepted updates is the FedAvg step every defense shares and is excluded from
both sides; ``mars_apply_resident`` lines time the whole ``mars().apply`` (aggregation included)
where the updates fit in memory.

The reference (``benchmarks/baselines/mars_reference.py``, PyTorch on ``--torch-device``) rebuilds
each client model, runs the per-channel ``torch.svd`` Python loop, the scipy double loop and
sklearn's KMeans, on the same updates. The per-channel loop is timed on the first
``--ref-be-clients`` clients and scaled linearly to N (``"extrapolated": true``); the other clients'
CBE come from a batched ``torch.linalg.svdvals`` (same values) so the whole reference decision is
still computed and compared with marsjax's (``agree``: same accepted set). torch runs with
``--torch-threads`` (default 1): on the shared 2-core machine, 2 threads made every small
``torch.svd`` take ~39 ms instead of 24-145 us.

Run (CPU numbers below; on a GPU add ``--backend gpu --chunk 100``)::

    python -m benchmarks.bench_mars --clients 20,100,500,1000

Measured on a 2-core x86-64 VM (AMD EPYC, 24 GB; other jobs were running, so absolute times are
pessimistic), jax 0.10.2, torch 2.13 CPU, 2026-11-26; the table is copied from
``benchmarks/results/mars_cost_cpu.jsonl``:

    clients  attackers  marsjax s/round  reference s/round  speedup  same flagged  ref. extrapolated
    20       4          6.1              10.3               1.70x    yes           no
    100      20         30.1             52.4               1.74x    yes           yes
    500      100        169.0            330.5              1.96x    yes           yes
    1000     200        252.7            559.5              2.21x    yes           yes

Rerun on 2026-11-27 on the same machine otherwise idle, after the eigvalsh ordering fix of
``marsjax/defenses/energy.py`` (two concurrent LAPACK calls had deadlocked XLA:CPU's thread pool
from 40 ResNet-18 clients on), ``--clients 20,100``: 1.33 s vs 3.04 s (2.29x) and 7.30 s vs
15.06 s (2.06x), same flagged clients.

On one H200 (``benchmarks/run_gpu.sh``, ``benchmarks/results/mars_cost_gpu.jsonl``): 100 clients
in 0.019 s per round (CBE 0.018 s), the reference on one host CPU thread 54 s (extrapolated).

Nearly all of both sides is the per-channel spectral norms (CBE); Wasserstein + k-means cost
marsjax 0.3 s at 1000 clients against the reference's 27.9 s (scipy double loop + sklearn).

Energy methods side by side (issue 16). Every chunk's CBE is computed and timed with each of
``--energy-methods`` (default ``eigvalsh,squaring``: LAPACK's eigensolver, MARS's default and the
reference path, and the repeated squaring of ``marsjax/mars/energy.py``), on the same device
arrays in the same run; each method's CBE matrix then goes through the same clustering and
selection. The ``jax_*`` keys (and the table above) are the first method, as in earlier
records; ``methods.<name>`` holds per method: ``s_per_round``, ``cbe_s_per_client``,
``speedup_vs_ref`` (vs the official-structure reference), ``agree_with_ref`` (same accepted
set), ``same_flagged_as_eigvalsh``, ``speedup_vs_eigvalsh`` and ``be_max_rel_err_svd64``: the
largest relative error of the BE of all 4,800 conv channels (BatchNorm gain included) of the
first ``--svd-clients`` client models against float64 ``np.linalg.svd``. ``resident.<name>``
times the whole ``mars(energy_method=name).apply``. A method written ``METHOD:FORM`` (e.g.
``squaring:channel_major``) also fixes the Gram form (``gram_form`` of
``marsjax/mars/energy.py``; without it the backend's default) and has no ``resident`` entry.
The record of 2026-12-01 (commit d1d25f1) ran
``--clients 100 --no-fedavg --energy-methods eigvalsh,squaring,eigvalsh:channel_major,squaring:channel_major``.

FedAvg's mean (``fedavg_mean``, where the updates fit in memory: ``--resident-max``): the stacked
updates' mean by ``marsjax.tree.weighted_mean`` (FedAvg's aggregation), ``jnp.mean``, the
weighted sum as a matrix-vector product ``w @ u.reshape(N, -1)`` (plain, with zero-weight rows
masked first, and plain with a masked redo only when the result is not finite), each against
``np.mean(axis=0)`` of the same buffers in the same run (``<name>_vs_numpy``).

The committed issue-16 results come from, on a quiet machine::

    python -m benchmarks.bench_mars --clients 100 --extras --out benchmarks/results/mars_cost_cpu.jsonl

and ``python -m benchmarks.bench_mars --table benchmarks/results/mars_cost_cpu.jsonl`` prints the
tables. The script itself is checked in a minute with ``--clients 4 --quick`` (timings
meaningless; prints the records and writes no file unless ``--out`` is given).

Also recorded there: ``sigma_max_method`` (Gram + eigvalsh vs Gram + squaring vs batched SVD for
the BE step) and ``kmeans_impl`` (this k-means vs ``ott.tools.k_means`` vs sklearn).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import sys
import time


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="20,100,500,1000", help="comma-separated client counts")
    p.add_argument("--backend", default="cpu", help="JAX platform: cpu, gpu/cuda, tpu")
    p.add_argument("--torch-device", default="cpu", help="cpu or cuda")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--chunk", type=int, default=10, help="clients per compiled CBE call")
    p.add_argument("--reps", type=int, default=3, help="repetitions (median) of timed steps")
    p.add_argument("--attack-frac", type=float, default=0.2)
    p.add_argument("--ref-be-clients", type=int, default=40, help="clients timed in the ref loop")
    p.add_argument("--ref-pairs", type=int, default=0, help="time only this many W1 pairs (0=all)")
    p.add_argument("--no-ref", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--resident-max", type=int, default=100, help="time mars().apply up to this N")
    p.add_argument("--extras", action="store_true", help="also the sigma_max and k-means cases")
    p.add_argument(
        "--energy-methods",
        default="eigvalsh,squaring",
        help="MARS energy methods timed side by side (the first one fills the jax_* keys); "
        "METHOD:FORM picks the Gram form too (e.g. squaring:channel_major)",
    )
    p.add_argument(
        "--svd-clients", type=int, default=2, help="clients whose BE is checked vs float64 SVD"
    )
    p.add_argument("--no-fedavg", action="store_true", help="skip FedAvg's mean vs numpy")
    p.add_argument(
        "--only-fedavg",
        action="store_true",
        help="only FedAvg's mean vs numpy (records case fedavg_mean; no MARS, no reference)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="check the script runs (1 rep, 2 timed reference clients, 1 SVD client; "
        "prints the records, writes a file only with --out)",
    )
    p.add_argument(
        "--out", default=None, help="JSON lines file (default results/mars_cost_<b>.jsonl)"
    )
    p.add_argument("--table", default=None, help="print the markdown table of a results file, exit")
    args = p.parse_args()
    if args.quick:
        args.reps = 1
        args.ref_be_clients = min(args.ref_be_clients, 2)
        args.svd_clients = min(args.svd_clients, 1)
    return args


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["JAX_PLATFORMS"] = {"gpu": "cuda"}.get(ARGS.backend, ARGS.backend)

import jax
import jax.numpy as jnp
import numpy as np

from marsjax.defenses._mars import mars, mars_cbe, mars_select, model_energy_layout
from marsjax.models import ResNet18
from marsjax.provenance import git_state

NUM_POOL = 8
ROOT = pathlib.Path(__file__).resolve().parent


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "torch_version": torch_version,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **git_state(),
    }


class Federation:
    """Synthetic ResNet-18 federation: only the leaves MARS reads, generated per chunk."""

    def __init__(self, seed: int = 0) -> None:
        self.model = ResNet18(10, "imagenet")
        x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
        self.layout = model_energy_layout(self.model, x)
        rng = np.random.default_rng(seed)
        shapes = jax.eval_shape(self.model.init, jax.random.key(0), x)["params"]
        self.kernels, self.scales, self.vars = {}, {}, {}
        self.pool, self.var_pool = {}, {}
        for layer in self.layout:
            kh, kw, cin, cout = _get(shapes, layer.path)["kernel"].shape
            std = math.sqrt(2.0 / (cout * kh * kw))
            self.kernels[layer.path] = (std * rng.standard_normal((kh, kw, cin, cout))).astype(
                np.float32
            )
            self.scales[layer.norm] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
            self.vars[layer.norm] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
            self.pool[layer.path] = (
                1e-2 * std * rng.standard_normal((NUM_POOL, kh, kw, cin, cout))
            ).astype(np.float32)
            self.var_pool[layer.norm] = (1e-2 * rng.standard_normal((NUM_POOL, cout))).astype(
                np.float32
            )
        # attackers amplify 16 channels of the last stage's 3x3 convolutions
        self.attacked = [l.path for l in self.layout if l.path[0].startswith("layer4")][-2:]
        self.attacked_channels = np.sort(rng.choice(512, 8, replace=False))
        self.num_params = sum(k.size for k in self.kernels.values()) + 2 * sum(
            v.size for v in self.scales.values()
        )

    def global_tree(self) -> dict:
        params, stats = {}, {}
        for layer in self.layout:
            _put(params, layer.path, "kernel", self.kernels[layer.path])
            _put(params, layer.norm, "scale", self.scales[layer.norm])
            _put(params, layer.norm, "bias", np.zeros_like(self.scales[layer.norm]))
            _put(stats, layer.norm, "var", self.vars[layer.norm])
            _put(stats, layer.norm, "mean", np.zeros_like(self.vars[layer.norm]))
        return {"params": params, "batch_stats": stats}

    def updates(self, ids: np.ndarray, num_attackers: int) -> dict:
        """Stacked updates ``[len(ids), ...]`` of the given clients (numpy, float32)."""
        coef = np.stack([np.random.default_rng(1000 + int(i)).uniform(0.5, 1.5, 3) for i in ids])
        coef = coef.astype(np.float32)
        a = ids % NUM_POOL
        b = (3 * ids + 1) % NUM_POOL
        params, stats = {}, {}
        for layer in self.layout:
            pool = self.pool[layer.path]
            c0 = coef[:, 0, None, None, None, None]
            c1 = coef[:, 1, None, None, None, None]
            k = c0 * pool[a] + c1 * pool[b]
            if layer.path in self.attacked:
                ch = self.attacked_channels
                for r in np.flatnonzero(ids < num_attackers):
                    k[r][..., ch] += 2.0 * self.kernels[layer.path][..., ch]
            _put(params, layer.path, "kernel", k)
            vp = self.var_pool[layer.norm]
            _put(params, layer.norm, "scale", coef[:, 2, None] * vp[b])
            _put(params, layer.norm, "bias", np.zeros_like(vp[a]))
            _put(stats, layer.norm, "var", coef[:, 2, None] * vp[a])
            _put(stats, layer.norm, "mean", np.zeros_like(vp[a]))
        return {"params": params, "batch_stats": stats}


def _put(tree: dict, path, leaf: str, value) -> None:
    for name in path:
        tree = tree.setdefault(name, {})
    tree[leaf] = value


def _get(tree: dict, path):
    for name in path:
        tree = tree[name]
    return tree


class Reference:
    """Drives benchmarks/baselines/mars_reference.py on the federation's updates."""

    def __init__(self, fed: Federation, device: str, threads: int) -> None:
        import torch

        from benchmarks.baselines import mars_reference as ref

        torch.set_num_threads(threads)
        self.torch, self.ref, self.fed, self.device = torch, ref, fed, device
        self.model = ref.ResNet18(10).to(device).eval()
        g = fed.global_tree()
        self.global_state = {}
        for name, value in self._torch_entries(g, None):
            self.global_state[name] = value
        # entries MARS does not read keep the model's own values in both implementations

    def _torch_entries(self, tree: dict, row: int | None):
        t = self.torch
        for layer in self.fed.layout:
            k = _get(tree["params"], layer.path)["kernel"]
            k = k if row is None else k[row]
            conv = self.ref.torch_name(layer.path)
            bn = self.ref.torch_name(layer.norm)
            yield (
                f"{conv}.weight",
                t.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1))).to(self.device),
            )
            for leaf, tname, coll in (
                ("scale", "weight", "params"),
                ("bias", "bias", "params"),
                ("var", "running_var", "batch_stats"),
                ("mean", "running_mean", "batch_stats"),
            ):
                v = _get(tree[coll], layer.norm)[leaf]
                v = v if row is None else v[row]
                yield f"{bn}.{tname}", t.from_numpy(np.ascontiguousarray(v)).to(self.device)

    def cbe(self, updates: dict, row: int, timed: bool) -> tuple[np.ndarray, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        self.ref.load_client(self.model, self.global_state, dict(self._torch_entries(updates, row)))
        fn = self.ref.cbe_official if timed else self.ref.cbe_batched
        out = fn(self.model).cpu().numpy()
        if self.device != "cpu":
            self.torch.cuda.synchronize()
        return out, time.perf_counter() - t0, time.process_time() - c0


def run_case(n: int, fed: Federation, g_dev, cbe_fns, select_fn, ref, args, compile_info) -> dict:
    """One client count: CBE with every energy method, the decision, the reference, FedAvg."""
    methods = list(cbe_fns)
    num_attackers = round(args.attack_frac * n)
    chunk = min(args.chunk, n)
    cbe_rows = {m: [] for m in methods}
    chunk_times = {m: [] for m in methods}
    chunk_cpu = {m: [] for m in methods}
    ref_cbes, ref_be_times, ref_be_cpu = [], [], []
    svd_err: dict = {}
    resident = [] if n <= args.resident_max else None
    for start in range(0, n, chunk):
        ids = np.arange(start, start + chunk)
        ids = np.minimum(ids, n - 1)  # the last chunk repeats the last client to keep the shape
        upd = fed.updates(ids, num_attackers)
        upd_dev = jax.device_put(upd)
        valid_rows = ids >= start
        valid_rows[1:] &= ids[1:] != ids[:-1]
        reps = args.reps if n <= args.resident_max else 1
        for m in methods:  # side by side on the same chunk
            cache = compile_info.setdefault("cbe", {})  # (method, chunk) -> (executable, s)
            if (m, chunk) not in cache:
                t = time.perf_counter()
                executable = cbe_fns[m].lower(upd_dev, g_dev).compile()
                cache[(m, chunk)] = (executable, time.perf_counter() - t)
            compiled = cache[(m, chunk)][0]
            jax.block_until_ready(compiled(upd_dev, g_dev))  # warm (allocations)
            wall, cpu = _timed(lambda u=upd_dev, c=compiled: c(u, g_dev), reps)
            chunk_times[m].append(wall)
            chunk_cpu[m].append(cpu)
            cbe_rows[m].append(np.asarray(compiled(upd_dev, g_dev))[valid_rows])
        if start == 0 and args.svd_clients > 0:
            svd_err = be_vs_float64_svd(fed, g_dev, upd, min(args.svd_clients, n), methods)
        if resident is not None:
            resident.append(jax.tree.map(lambda a, m=valid_rows: a[m], upd_dev))
        if ref is not None:
            for r, i in enumerate(ids[valid_rows]):
                timed = i < args.ref_be_clients
                vec, dt, dc = ref.cbe(upd, r, timed)
                ref_cbes.append(vec)
                if timed:
                    ref_be_times.append(dt)
                    ref_be_cpu.append(dc)
        del upd, upd_dev
    scale = n / (chunk * len(chunk_times[methods[0]]))  # the last chunk may hold repeated rows
    valid = jnp.ones(n, bool)
    per_method, cbes = {}, {}
    for m in methods:
        cbe = jnp.asarray(np.concatenate(cbe_rows[m]))
        cbes[m] = cbe
        if n not in compile_info.setdefault("select_compile_s", {}):
            t = time.perf_counter()
            compiled_sel = select_fn.lower(cbe, valid).compile()
            compile_info["select_compile_s"][n] = time.perf_counter() - t
            compile_info.setdefault("select_compiled", {})[n] = compiled_sel
        compiled_sel = compile_info["select_compiled"][n]
        jax.block_until_ready(compiled_sel(cbe, valid))
        select_s, select_cpu = _timed(lambda c=cbe, f=compiled_sel: f(c, valid), args.reps)
        accepted = np.asarray(compiled_sel(cbe, valid).accepted)
        per_method[m] = {
            "s_per_round": sum(chunk_times[m]) * scale + select_s,
            "cbe_s": sum(chunk_times[m]) * scale,
            "cbe_s_per_client": sum(chunk_times[m]) * scale / n,
            "select_s": select_s,
            "cpu_s_per_round": sum(chunk_cpu[m]) * scale + select_cpu,
            "cbe_compile_s": compile_info["cbe"][(m, chunk)][1],
            "flagged": np.flatnonzero(~accepted).tolist(),
            "accepted": accepted,
            "be_max_rel_err_svd64": svd_err.get(m),
        }
    first = per_method[methods[0]]
    rec = {
        "case": "mars_cost",
        "model": "resnet18_imagenet_stem",
        "clients": n,
        "attackers": num_attackers,
        "params_read_per_client": fed.num_params,
        "cbe_len": int(cbes[methods[0]].shape[1]),
        "energy_methods": methods,
        # the jax_* keys: the first method (eigvalsh, MARS's default), as in earlier records
        "jax_energy_method": methods[0],
        "jax_s_per_round": first["s_per_round"],
        "jax_cbe_s": first["cbe_s"],
        "jax_select_s": first["select_s"],
        "jax_cpu_s_per_round": first["cpu_s_per_round"],
        "jax_chunk": chunk,
        "jax_cbe_compile_s": first["cbe_compile_s"],
        "jax_select_compile_s": compile_info["select_compile_s"][n],
        "jax_flagged": first["flagged"],
        "svd64_clients": min(args.svd_clients, n),
    }
    for m in methods[1:]:
        pm = per_method[m]
        pm[f"same_flagged_as_{methods[0]}"] = pm["flagged"] == first["flagged"]
        pm[f"speedup_vs_{methods[0]}"] = first["s_per_round"] / pm["s_per_round"]
        a, b = np.asarray(cbes[m], np.float64), np.asarray(cbes[methods[0]], np.float64)
        pm[f"cbe_max_rel_diff_to_{methods[0]}"] = float(
            np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))
        )
    if ref is not None:
        ref_cbe = np.stack(ref_cbes)
        per_client = statistics.mean(ref_be_times)
        t, c = time.perf_counter(), time.process_time()
        pairs_all = n * (n - 1) // 2
        limit = args.ref_pairs if args.ref_pairs and args.ref_pairs < pairs_all else None
        d, done = ref.ref.wasserstein_matrix_scipy(list(ref_cbe.astype(np.float64)), limit)
        w_s, w_cpu = time.perf_counter() - t, time.process_time() - c
        if limit is not None:  # complete the matrix with the equivalent closed form (untimed)
            s = np.sort(ref_cbe.astype(np.float64), axis=1)
            d = np.abs(s[:, None, :] - s[None, :, :]).mean(-1)
            w_s *= pairs_all / max(done, 1)
            w_cpu *= pairs_all / max(done, 1)
        t, c = time.perf_counter(), time.process_time()
        ref_acc, _ = ref.ref.detect(ref_cbe.astype(np.float64), d)
        detect_s, detect_cpu = time.perf_counter() - t, time.process_time() - c
        ref_s = per_client * n + w_s + detect_s
        ref_cpu = statistics.mean(ref_be_cpu) * n + w_cpu + detect_cpu

        def rel_to_ref(cbe) -> float:
            cbe = np.asarray(cbe)
            return float(np.max(np.abs(ref_cbe - cbe) / np.maximum(np.abs(ref_cbe), 1e-12)))

        rec.update(
            {
                "ref_s_per_round": ref_s,
                "ref_cbe_s": per_client * n,
                "ref_cbe_s_per_client": per_client,
                "ref_cbe_timed_clients": len(ref_be_times),
                "ref_w1_s": w_s,
                "ref_w1_pairs_timed": done,
                "ref_kmeans_select_s": detect_s,
                "ref_torch_device": args.torch_device,
                "ref_torch_threads": args.torch_threads,
                "extrapolated": len(ref_be_times) < n or limit is not None,
                "ref_cpu_s_per_round": ref_cpu,
                "speedup": ref_s / rec["jax_s_per_round"],
                "speedup_cpu_time": ref_cpu / rec["jax_cpu_s_per_round"],
                "ref_flagged": np.flatnonzero(~ref_acc).tolist(),
                "agree": bool(np.array_equal(ref_acc, first["accepted"])),
                "cbe_max_rel_diff": rel_to_ref(cbes[methods[0]]),
            }
        )
        for m in methods:
            pm = per_method[m]
            pm["speedup_vs_ref"] = ref_s / pm["s_per_round"]
            pm["speedup_vs_ref_cpu_time"] = ref_cpu / pm["cpu_s_per_round"]
            pm["agree_with_ref"] = bool(np.array_equal(ref_acc, pm["accepted"]))
            pm["cbe_max_rel_diff_to_ref"] = rel_to_ref(cbes[m])
    for pm in per_method.values():
        del pm["accepted"]
    rec["methods"] = per_method
    rec["flagged_are_attackers"] = rec["jax_flagged"] == list(range(num_attackers))
    if resident is not None:
        del cbe_rows, cbes
        updates = jax.tree.map(lambda *a: jnp.concatenate(a), *resident)
        resident.clear()  # keep one copy of the stacked updates alive
        rec["resident"] = {  # mars() itself: the backend's Gram form only
            m: _resident_apply(updates, fed, g_dev, args, m) for m in methods if ":" not in m
        }
        if not args.no_fedavg:
            rec["fedavg_mean"] = fedavg_case(updates, args.reps)
        del updates
    return rec


def be_vs_float64_svd(fed: Federation, g_dev, upd: dict, k: int, methods) -> dict:
    """Max relative error of every method's BE (all 4,800 conv channels, BatchNorm gain included)
    to float64 numpy SVD, over the first ``k`` client models of ``upd``."""
    from marsjax.mars.defense import _subtree
    from marsjax.mars.energy import BN_EPSILON, backdoor_energy

    g = _subtree(g_dev, fed.layout)
    u = jax.tree.map(lambda a: jnp.asarray(a[:k]), _subtree(upd, fed.layout))
    models = jax.tree.map(lambda a, b: a[None] + b, g, u)  # float32, as MARS forms them
    want = []
    for i in range(k):
        per_layer = []
        for layer in fed.layout:
            kern = np.asarray(_get(models["params"], layer.path)["kernel"][i], np.float64)
            kh, kw, cin, cout = kern.shape
            mats = kern.reshape(kh * kw * cin, cout).T.reshape(cout, kh * kw, cin)
            sigma = np.linalg.svd(mats, compute_uv=False)[:, 0]
            gamma = np.asarray(_get(models["params"], layer.norm)["scale"][i], np.float64)
            var = np.asarray(_get(models["batch_stats"], layer.norm)["var"][i], np.float64)
            var = np.where(np.isnan(var) | (var < 0), 0.0, var)
            per_layer.append(sigma * np.abs(gamma / np.sqrt(var + BN_EPSILON)))
        want.append(np.concatenate(per_layer))
    want = np.stack(want)
    out = {}
    for m in methods:
        method, form = _method_form(m)
        f = jax.jit(
            jax.vmap(
                lambda t, m=method, g=form: backdoor_energy(
                    t, layout=fed.layout, method=m, gram_form=g
                )
            )
        )
        got = np.concatenate([np.asarray(x, np.float64) for x in f(models)], axis=1)
        out[m] = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-300)))
    return out


def _method_form(spec: str) -> tuple[str, str | None]:
    """``"squaring:pairs"`` -> ``("squaring", "pairs")``; no ``:form``: the backend default."""
    method, _, form = spec.partition(":")
    return method, form or None


def _resident_apply(updates, fed, g_dev, args, method: str) -> dict:
    n = jax.tree.leaves(updates)[0].shape[0]
    defense = mars(layout=fed.layout, chunk_size=min(args.chunk, n), energy_method=method)
    state = defense.init(g_dev)
    weights = jnp.ones(n)

    @jax.jit
    def apply(u, s, g, w):
        return defense.apply(jax.random.key(0), u, s, global_variables=g, client_weights=w)

    t = time.perf_counter()
    compiled = apply.lower(updates, state, g_dev, weights).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(compiled(updates, state, g_dev, weights))
    steady, steady_cpu = _timed(lambda: compiled(updates, state, g_dev, weights), args.reps)
    result, _ = compiled(updates, state, g_dev, weights)
    return {
        "apply_s": steady,
        "apply_cpu_s": steady_cpu,
        "apply_compile_s": compile_s,
        "flagged": np.flatnonzero(np.asarray(result.accepted) == 0).tolist(),
    }


def fedavg_case(updates, reps: int) -> dict:
    """FedAvg's mean of the stacked updates vs a numpy mean of the same arrays (issue 16).

    ``numpy``: ``np.mean(a, axis=0)`` per leaf of the host view of the same buffers.
    ``weighted_mean``: :func:`marsjax.tree.weighted_mean` with equal weights, what FedAvg runs
    (a ``where``-masked weighted sum over the client axis). ``jnp_mean``: ``jnp.mean(a, 0)``.
    ``matmul``: the weighted sum as ``w @ a.reshape(N, -1)`` per leaf (a GEMV, no masking: a
    NaN row with weight 0 would poison it). ``matmul_masked``: the same after zeroing rows with
    weight 0 (``where``), which keeps ``weighted_mean``'s contract. ``matmul_checked``: the plain
    GEMV, redone masked only when its result is not finite (the contract at GEMV speed when no
    row is poisoned; XLA computes the unmasked GEMV once). Errors: max abs difference to
    a float64 numpy mean, relative to the largest mean entry.
    """
    from marsjax.tree import weighted_mean

    leaves = jax.tree.leaves(updates)
    n = leaves[0].shape[0]
    host = [np.asarray(a) for a in leaves]
    want = [np.mean(a, axis=0, dtype=np.float64) for a in host]
    scale = max(float(np.max(np.abs(w))) for w in want)
    weights = jnp.ones(n, jnp.float32)

    def gemv(u, w, masked):
        w = w / jnp.sum(w)

        def one(a):
            flat = a.reshape(n, -1)
            if masked:
                flat = jnp.where((w != 0)[:, None], flat, 0)
            hi = jax.lax.Precision.HIGHEST
            return jnp.dot(w.astype(a.dtype), flat, precision=hi).reshape(a.shape[1:])

        return jax.tree.map(one, u)

    def checked(u, w):
        plain = gemv(u, w, False)  # computed once, an operand of the cond
        # finiteness as a product too: x . 0 is NaN iff some entry of x is not finite (XLA:CPU's
        # reductions, jnp.all(jnp.isfinite(x)) included, run far below memory speed)
        probe = sum(
            jnp.dot(x.reshape(-1), jnp.zeros(x.size, x.dtype)) for x in jax.tree.leaves(plain)
        )
        finite = jnp.isfinite(probe)
        return jax.lax.cond(finite, lambda: plain, lambda: gemv(u, w, True))

    fns = {
        "weighted_mean": lambda u, w: weighted_mean(u, w),
        "jnp_mean": lambda u, w: jax.tree.map(lambda a: jnp.mean(a, axis=0), u),
        "matmul": lambda u, w: gemv(u, w, False),
        "matmul_masked": lambda u, w: gemv(u, w, True),
        "matmul_checked": checked,
    }
    rec: dict = {"clients": n, "floats_per_client": int(sum(a[0].size for a in host))}
    rec["numpy_s"], rec["numpy_cpu_s"] = _timed(
        lambda: [np.mean(a, axis=0) for a in host], max(reps, 3)
    )
    for name, fn in fns.items():
        jf = jax.jit(fn)
        t = time.perf_counter()
        compiled = jf.lower(updates, weights).compile()
        rec[f"{name}_compile_s"] = time.perf_counter() - t
        out = jax.tree.leaves(jax.block_until_ready(compiled(updates, weights)))
        rec[f"{name}_s"], rec[f"{name}_cpu_s"] = _timed(
            lambda c=compiled: c(updates, weights), max(reps, 3)
        )
        rec[f"{name}_vs_numpy"] = rec[f"{name}_s"] / rec["numpy_s"]
        err = max(float(np.max(np.abs(np.asarray(o, np.float64) - w))) for o, w in zip(out, want))
        rec[f"{name}_max_err"] = err / scale
    return rec


def _timed(fn, reps: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of ``reps`` calls."""
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def sigma_case(fed: Federation, reps: int) -> dict:
    """sigma_max of the 4,800 conv channels of one ResNet-18: batched SVD vs Gram + eigvalsh vs
    Gram + repeated squaring.

    Both methods get the same contiguous ``[C_out, kh*kw, C_in]`` channel matrices (prepared on
    the host); ``backdoor_energy_hwio`` is the whole BE step from the flax ``HWIO`` kernels
    (including the layout change), as MARS runs it.
    """
    from marsjax.defenses.energy import _channel_matrices, _matrix_norms, backdoor_energy

    kernels = [jnp.asarray(fed.kernels[l.path]) for l in fed.layout]
    mats = [jnp.asarray(np.ascontiguousarray(np.asarray(_channel_matrices(k)))) for k in kernels]
    ref = np.concatenate(
        [np.linalg.svd(np.asarray(m, np.float64), compute_uv=False)[:, 0] for m in mats]
    )
    no_bn = tuple(l._replace(norm=None) for l in fed.layout)
    tree = {"params": {}}
    for l, k in zip(fed.layout, kernels):
        _put(tree["params"], l.path, "kernel", k)

    def svd_fn(ms):
        return jnp.concatenate([jnp.linalg.svd(m, compute_uv=False)[:, 0] for m in ms])

    def gram_fn(ms):
        return jnp.concatenate(_matrix_norms(ms, False))

    def squaring_fn(ms):
        return jnp.concatenate(_matrix_norms(ms, False, "squaring"))

    def hwio_fn(t):
        return jnp.concatenate(backdoor_energy(t, layout=no_bn))

    rec = {"case": "sigma_max_method", "channels": int(ref.size), "batch_for_vmap": 8}
    for name, fn, arg in (
        ("svd", svd_fn, mats),
        ("gram_eigvalsh", gram_fn, mats),
        ("gram_squaring", squaring_fn, mats),
        ("backdoor_energy_hwio", hwio_fn, tree),
    ):
        jf = jax.jit(fn)
        t = time.perf_counter()
        out = jax.block_until_ready(jf(arg))
        rec[f"{name}_compile_s"] = time.perf_counter() - t
        rec[f"{name}_s"], rec[f"{name}_cpu_s"] = _timed(lambda jf=jf, a=arg: jf(a), reps)
        rec[f"{name}_max_rel_err"] = float(np.max(np.abs(np.asarray(out) - ref) / ref))
        batch = jax.tree.map(lambda x: jnp.broadcast_to(x, (8, *x.shape)) + 0.0, arg)
        jv = jax.jit(jax.vmap(fn))
        jax.block_until_ready(jv(batch))
        wall, cpu = _timed(lambda jv=jv, b=batch: jv(b), reps)
        rec[f"{name}_vmap8_s_per_client"], rec[f"{name}_vmap8_cpu_s_per_client"] = wall / 8, cpu / 8
    return rec


def kmeans_case(reps: int) -> list[dict]:
    """This k-means vs ott.tools.k_means vs sklearn on W1-matrix rows."""
    from sklearn.cluster import KMeans

    from marsjax.defenses.clustering import kmeans
    from marsjax.defenses.wasserstein import wasserstein_matrix

    out = []
    for n in (20, 1000):
        rng = np.random.default_rng(n)
        cbe = np.abs(rng.standard_normal((n, 250))).astype(np.float32)
        cbe[: n // 5] += 1.0
        d = jax.jit(wasserstein_matrix)(jnp.asarray(cbe))
        rec = {"case": "kmeans_impl", "clients": n}
        ours = jax.jit(lambda x: kmeans(jax.random.key(0), x).labels)
        jax.block_until_ready(ours(d))
        rec["marsjax_s"], rec["marsjax_cpu_s"] = _timed(lambda f=ours, x=d: f(x), max(reps, 10))
        try:
            from ott.tools.k_means import k_means

            ott_fn = jax.jit(lambda x: k_means(x, 2, n_init=10, rng=jax.random.key(0)).assignment)
            jax.block_until_ready(ott_fn(d))
            rec["ott_s"], rec["ott_cpu_s"] = _timed(lambda f=ott_fn, x=d: f(x), max(reps, 10))
        except ImportError:
            rec["ott_s"] = rec["ott_cpu_s"] = None
        t, c = time.perf_counter(), time.process_time()
        sk = KMeans(2, random_state=0, n_init=10).fit(np.asarray(d)).labels_
        rec["sklearn_s"], rec["sklearn_cpu_s"] = time.perf_counter() - t, time.process_time() - c
        mine = np.asarray(ours(d))
        rec["same_as_sklearn"] = bool(np.all(mine == sk) or np.all(mine == 1 - sk))
        out.append(rec)
    return out


def table(path: str) -> str:
    """The docstring's table from a results file (the last record per client count)."""
    recs, fedavg_only = {}, {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["case"] == "mars_cost":
                recs[rec["clients"]] = rec
            elif rec["case"] == "fedavg_mean":  # --only-fedavg records, newer than the above
                fedavg_only[rec["clients"]] = rec
    rows = [
        (
            "| clients | marsjax s/round (CPU s) | reference s/round (CPU s) | speedup "
            "| CBE stage: marsjax / ref s | W1 + 2-means + select: marsjax / ref s | same flagged |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for n, r in sorted(recs.items()):
        star = " *" if r.get("extrapolated") else ""
        if "ref_s_per_round" in r:
            ref = f"{r['ref_s_per_round']:.1f} ({r['ref_cpu_s_per_round']:.1f}){star}"
            speed = f"{r['speedup']:.1f}x"
            stage1 = f"{r['jax_cbe_s']:.1f} / {r['ref_cbe_s']:.1f}{star}"
            sel = r["ref_w1_s"] + r["ref_kmeans_select_s"]
            stage2 = f"{r['jax_select_s']:.3f} / {sel:.2f}"
            agree = f"{r['agree']} ({len(r['jax_flagged'])} of {n})"
        else:
            ref = speed = stage1 = stage2 = agree = "-"
        rows.append(
            f"| {n} | {r['jax_s_per_round']:.1f} ({r['jax_cpu_s_per_round']:.1f}) | {ref} "
            f"| {speed} | {stage1} | {stage2} | {agree} |"
        )
    with_methods = {n: r for n, r in recs.items() if "methods" in r}
    if with_methods:
        rows += [
            "",
            (
                "| clients | energy method | s/round (CPU s) | x reference | BE max rel. err. vs "
                "float64 SVD | same flagged as reference |"
            ),
            "|---|---|---|---|---|---|",
        ]
        for n, r in sorted(with_methods.items()):
            for m, pm in r["methods"].items():
                err = pm.get("be_max_rel_err_svd64")
                rows.append(
                    f"| {n} | {m} | {pm['s_per_round']:.2f} ({pm['cpu_s_per_round']:.2f}) "
                    f"| {pm.get('speedup_vs_ref', float('nan')):.1f}x "
                    f"| {'-' if err is None else f'{err:.1e}'} | {pm.get('agree_with_ref', '-')} |"
                )
    with_fedavg = {n: r["fedavg_mean"] for n, r in recs.items() if "fedavg_mean" in r}
    with_fedavg.update(fedavg_only)
    if with_fedavg:
        names = ("weighted_mean", "jnp_mean", "matmul", "matmul_masked", "matmul_checked")
        rows += [
            "",
            "| clients | numpy mean s | " + " | ".join(f"{k} s (x numpy)" for k in names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for n, f in sorted(with_fedavg.items()):
            cells = " | ".join(f"{f[k + '_s']:.3f} ({f[k + '_vs_numpy']:.1f}x)" for k in names)
            rows.append(f"| {n} | {f['numpy_s']:.3f} | {cells} |")
    return "\n".join(rows)


def main() -> None:
    args = ARGS
    if args.table:
        print(table(args.table))
        return
    info = machine()
    command = "python -m benchmarks.bench_mars " + " ".join(sys.argv[1:])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    out = pathlib.Path(args.out or ROOT / "results" / f"mars_cost_{info['backend']}.jsonl")
    if args.quick and not args.out:  # a smoke run never appends to the committed results
        out = None
    else:
        out.parent.mkdir(parents=True, exist_ok=True)

    def emit(rec: dict) -> None:
        rec = {**rec, **info, "peak_rss_mb": peak_rss_mb(), "command": command, "date": date}
        line = json.dumps(rec)
        print(line, flush=True)
        if out is None:
            return
        with open(out, "a") as f:
            f.write(line + "\n")

    fed = Federation()
    g_dev = jax.device_put(fed.global_tree())
    methods = [m.strip() for m in args.energy_methods.split(",") if m.strip()]

    def cbe_fn(spec: str):
        method, form = _method_form(spec)
        return jax.jit(
            lambda u, g: mars_cbe(u, g, fed.layout, energy_method=method, gram_form=form)
        )

    cbe_fns = {m: cbe_fn(m) for m in methods}
    select_fn = jax.jit(lambda c, v: mars_select(jax.random.key(0), c, v, 0.03))
    ref = (
        None
        if args.no_ref or args.only_fedavg
        else Reference(fed, args.torch_device, args.torch_threads)
    )
    if args.extras and not args.only_fedavg:
        emit(sigma_case(fed, args.reps))
        for rec in kmeans_case(args.reps):
            emit(rec)
    compile_info: dict = {}
    for n in (int(c) for c in args.clients.split(",") if c.strip()):
        if args.only_fedavg:
            ids = np.arange(n)
            updates = jax.device_put(fed.updates(ids, round(args.attack_frac * n)))
            emit({"case": "fedavg_mean", "clients": n, **fedavg_case(updates, args.reps)})
            del updates
            continue
        emit(run_case(n, fed, g_dev, cbe_fns, select_fn, ref, args, compile_info))


if __name__ == "__main__":
    main()
