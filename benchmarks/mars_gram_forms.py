"""Formulations of MARS's per-channel Gram matrices on XLA:CPU, side by side (issue 16).

MARS's backdoor energy needs ``sigma_max`` of every output channel's ``kh*kw x C_in`` matrix;
``marsjax/mars/energy.py`` forms each channel's ``9 x 9`` Gram matrix (``3 x 3`` for the RGB stem,
``1 x 1`` for 1x1 kernels), then takes its largest eigenvalue (``eigvalsh``, or repeated
squaring). Issue 16 asks for MARS at 10x the official-structure reference, i.e. about 24 ms per
ResNet-18 client on the 2-core CPU; MARS took 90-100 ms, most of it the Gram step. The Gram is only ~0.2 GFLOP per
client (9x the kernel's size in multiply-adds), so this script measures which formulation XLA:CPU
runs closest to matmul speed, on ResNet-18's 20 conv kernels (ImageNet stem, 4,800 channels),
``--clients`` clients under one ``vmap``, one compiled call each:

* ``<form>_<method>``: ``energy._conv_norms`` with ``gram_form`` ``channel_major`` (the 2-D
  transpose to ``[C_out, 9, C_in]`` + a batched ``einsum``: MARS's only form before this
  benchmark), ``pairs`` (the CPU default since) or ``reduce``, and ``method`` ``eigvalsh`` or ``squaring``.
* ``gram_*``: the Gram step alone (outputs flattened): ``channel_major``; ``flax_bcast``
  (``sum(m[:, None] * m[None], C_in)`` in the flax layout, no transpose; jaxlib 0.10.2
  miscompiles it under ``vmap`` with one client, see ``marsjax/mars/energy.py``);
  ``flax_pairs`` (the 45 distinct pairs as separate reductions: the ``pairs`` form);
  ``flax_reduce`` (the same 45 products as one variadic ``lax.reduce``, one pass over the kernel:
  the ``reduce`` form);
  ``tiled_gemm<T>`` (channels in tiles of ``T``: one ``9T x 9T`` product per tile, the diagonal
  blocks kept; ``T`` times the arithmetic, as plain matrix products); ``cin_major`` (kernel moved
  to ``[C_in, C_out, 9]``, outer products summed over ``C_in``).
* ``pairs_squaring_prev``: ``pairs_squaring`` with the eigenvalue step as it was until commit
  6f47639 (rescaled by the trace after every product; ``lambda_max_prev``), to measure the
  current step (a Frobenius rescaling every ``SQUARINGS_PER_SCALE`` products; at commit 6f47639
  also run in ``lax.map`` blocks of 2,048 Grams) side by side.
* ``gram_flax_pairs_blocked64`` / ``pairs_blocked64_squaring``: the ``pairs`` Gram over 64-row
  slices of the reduction axis in a ``fori_loop`` (each slice re-read from cache by the 45
  products), alone and inside the whole BE step (tried for issue 16, not adopted: see
  ``benchmarks/results/mars_gram_forms_cpu.jsonl``).
* ``soa_squaring``: ``flax_bcast`` Grams kept as ``[9, 9, C_out]`` and squared elementwise along
  the channel axis (structure of arrays) instead of as a batch of 9x9 matrix products.

Every full method is checked against float64 numpy (``max_rel_err``). Each time is the best of
``--reps`` calls, wall and process CPU, per client. ``--chunk C`` runs every case over the
clients in ``lax.map`` chunks of ``C`` (as ``mars(chunk_size=C)`` and ``benchmarks/bench_mars.py``
do) instead of one ``vmap`` over all of them. Run::

    python -m benchmarks.mars_gram_forms --clients 10 --out benchmarks/results/mars_gram_forms_cpu.jsonl
    python -m benchmarks.mars_gram_forms --clients 100 [--chunk 10] --only pairs_squaring,reduce_squaring,gram_flax_pairs,gram_flax_reduce --out ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_mars import machine, peak_rss_mb
from marsjax.mars import energy as E

ROOT = pathlib.Path(__file__).resolve().parent
HI = jax.lax.Precision.HIGHEST

# ResNet-18 (ImageNet stem) conv kernels in flax layout [kh, kw, C_in, C_out]: 4,800 channels.
RESNET18_KERNELS = (
    [(7, 7, 3, 64)]
    + [(3, 3, 64, 64)] * 4
    + [(3, 3, 64, 128)] + [(3, 3, 128, 128)] * 3 + [(1, 1, 64, 128)]
    + [(3, 3, 128, 256)] + [(3, 3, 256, 256)] * 3 + [(1, 1, 128, 256)]
    + [(3, 3, 256, 512)] + [(3, 3, 512, 512)] * 3 + [(1, 1, 256, 512)]
)  # fmt: skip


def _small_side(k: jax.Array) -> jax.Array:
    """``[d, n, C_out]``: the kernel with its smaller side (``kh*kw`` or ``C_in``) first."""
    kh, kw, cin, cout = k.shape
    m = k.reshape(kh * kw, cin, cout)
    return jnp.swapaxes(m, 0, 1) if kh * kw > cin else m


def gram_flax_bcast(k: jax.Array) -> jax.Array:
    m = _small_side(k)
    return jnp.sum(m[:, None] * m[None, :], axis=2)  # [d, d, C_out]


def gram_flax_pairs(k: jax.Array) -> jax.Array:
    """The shipped ``"pairs"`` form (``[C_out, d, d]``)."""
    return E._pair_gram(_small_side(k))


def gram_flax_reduce(k: jax.Array) -> jax.Array:
    """The shipped ``"reduce"`` form: the same pairs as one variadic reduction."""
    return E._reduce_gram(_small_side(k))


_SHIPPED_PAIR_GRAM = E._pair_gram


def pair_gram_blocked(m: jax.Array, block: int = 64) -> jax.Array:
    """``energy._pair_gram`` over ``block``-row slices of the reduction axis in a ``fori_loop``,
    so the 45 products of one slice re-read it from cache instead of memory (tried for issue 16)."""
    d, n, cout = m.shape
    if d == 1 or n % block or n // block < 2:
        return _SHIPPED_PAIR_GRAM(m)
    pairs = E._upper_pairs(d)

    def body(i, acc):
        s = jax.lax.dynamic_slice_in_dim(m, i * block, block, axis=1)
        return acc + jnp.stack([jnp.sum(s[a] * s[b], axis=0) for a, b in pairs])

    acc = jax.lax.fori_loop(0, n // block, body, jnp.zeros((len(pairs), cout), m.dtype))
    return E._symmetric(d, pairs, list(acc))


def gram_tiled(k: jax.Array, tile: int) -> jax.Array:
    kh, kw, cin, cout = k.shape
    d = kh * kw
    if d > cin or d == 1:
        return gram_flax_pairs(k)
    t = min(tile, cout)
    n = cout // t
    x = k.reshape(d, cin, n, t).transpose(2, 1, 0, 3).reshape(n, cin, d * t)
    p = jnp.einsum("nia,nib->nab", x, x, precision=HI).reshape(n, d, t, d, t)
    g = jnp.diagonal(p, axis1=2, axis2=4)  # [n, d, d, t]
    return g.transpose(1, 2, 0, 3).reshape(d, d, cout)


def gram_cin_major(k: jax.Array) -> jax.Array:
    y = jnp.transpose(_small_side(k), (1, 2, 0))  # [n, C_out, d]
    return jnp.sum(y[:, :, :, None] * y[:, :, None, :], axis=0)  # [C_out, d, d]


def gram_channel_major(k: jax.Array) -> jax.Array:
    return E._gram(E._channel_matrices(k))


def lambda_max_soa(g: jax.Array, num_squarings: int = E.NUM_SQUARINGS) -> jax.Array:
    """``lambda_max`` of ``[d, d, N]`` Grams by trace-normalised squaring along the last axis."""
    d = g.shape[0]
    if d == 1:
        return g[0, 0]

    def normalise(b):
        t = sum(b[i, i] for i in range(d))
        return b / jnp.where(t > 0, t, 1.0)

    b = normalise(g)
    for _ in range(num_squarings):
        b = normalise(jnp.sum(b[:, :, None, :] * b[None, :, :, :], axis=1))
    t = sum(b[i, i] for i in range(d))
    return jnp.sum(g * b, axis=(0, 1)) / jnp.where(t > 0, t, 1.0)


def lambda_max_prev(g: jax.Array, num_squarings: int = E.NUM_SQUARINGS) -> jax.Array:
    """The squaring step as it was until commit 6f47639: trace rescaling after every product."""

    def normalise(b):
        t = jnp.trace(b, axis1=-2, axis2=-1)
        return b / jnp.where(t > 0, t, 1.0)[..., None, None]

    b = normalise(g)
    for _ in range(num_squarings):
        b = normalise(jnp.matmul(b, b, precision=HI))
    t = jnp.trace(b, axis1=-2, axis2=-1)
    return jnp.sum(g * b, axis=(-2, -1)) / jnp.where(t > 0, t, 1.0)


def _prev_squaring(ks_one: list[jax.Array]) -> jax.Array:
    """``pairs`` Grams with :func:`lambda_max_prev`, the Grams of one size in one batch."""
    grams, _ = E._conv_grams(ks_one, False, "pairs")
    lams: list[jax.Array | None] = [g[..., 0, 0] if g.shape[-1] == 1 else None for g in grams]
    by_size: dict[int, list[int]] = {}
    for i, g in enumerate(grams):
        if g.shape[-1] > 1:
            by_size.setdefault(g.shape[-1], []).append(i)
    for idx in by_size.values():
        lam = lambda_max_prev(jnp.concatenate([grams[i] for i in idx]))
        start = 0
        for i in idx:
            lams[i] = lam[start : start + grams[i].shape[0]]
            start += grams[i].shape[0]
    return jnp.sqrt(jnp.maximum(jnp.concatenate(lams), 0.0))


def _full(per_kernel):
    return lambda ks: jax.vmap(lambda *kk: jnp.concatenate([per_kernel(k) for k in kk]))(*ks)


def _gram_only(gram):
    return lambda ks: jax.vmap(lambda *kk: jnp.concatenate([gram(k).reshape(-1) for k in kk]))(*ks)


def _chunked(fn, chunk: int):
    """``fn`` over the clients in ``lax.map`` chunks of ``chunk`` (as ``mars(chunk_size=chunk)``)."""

    def f(ks):
        n = ks[0].shape[0]
        out = jax.lax.map(fn, [k.reshape(n // chunk, chunk, *k.shape[1:]) for k in ks])
        return out.reshape(n, *out.shape[2:])

    return f


def cases() -> dict:
    def energy(method, form):
        return lambda ks: jax.vmap(
            lambda *kk: jnp.concatenate(
                E._conv_norms(list(kk), False, method, E.NUM_SQUARINGS, gram_form=form)
            )
        )(*ks)

    def blocked_squaring(ks):
        # The shipped pairs_squaring path with its Gram formed by pair_gram_blocked: the swap
        # happens while jit traces this function, so the compiled program holds the blocked form.
        E._pair_gram = pair_gram_blocked
        try:
            return energy("squaring", "pairs")(ks)
        finally:
            E._pair_gram = _SHIPPED_PAIR_GRAM

    return {
        "channel_major_eigvalsh": energy("eigvalsh", "channel_major"),
        "pairs_blocked64_squaring": blocked_squaring,
        "channel_major_squaring": energy("squaring", "channel_major"),
        "pairs_eigvalsh": energy("eigvalsh", "pairs"),
        "pairs_squaring": energy("squaring", "pairs"),
        "reduce_eigvalsh": energy("eigvalsh", "reduce"),
        "reduce_squaring": energy("squaring", "reduce"),
        "pairs_squaring_prev": lambda ks: jax.vmap(lambda *kk: _prev_squaring(list(kk)))(*ks),
        "soa_squaring": _full(
            lambda k: jnp.sqrt(jnp.maximum(lambda_max_soa(gram_flax_bcast(k)), 0))
        ),
        "gram_channel_major": _gram_only(gram_channel_major),
        "gram_flax_bcast": _gram_only(gram_flax_bcast),
        "gram_flax_pairs": _gram_only(gram_flax_pairs),
        "gram_flax_reduce": _gram_only(gram_flax_reduce),
        "gram_flax_pairs_blocked64": _gram_only(lambda k: pair_gram_blocked(_small_side(k))),
        "gram_tiled_gemm4": _gram_only(lambda k: gram_tiled(k, 4)),
        "gram_tiled_gemm8": _gram_only(lambda k: gram_tiled(k, 8)),
        "gram_cin_major": _gram_only(gram_cin_major),
    }


def reference(kernels: list[np.ndarray]) -> np.ndarray:
    rows = []
    for c in range(kernels[0].shape[0]):
        r = []
        for k in kernels:
            kh, kw, cin, cout = k.shape[1:]
            m = k[c].astype(np.float64).reshape(kh * kw, cin, cout).transpose(2, 0, 1)
            r.append(np.linalg.norm(m, ord=2, axis=(1, 2)))
        rows.append(np.concatenate(r))
    return np.stack(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="run each case in lax.map chunks of this many clients (default: one vmap)",
    )
    p.add_argument("--only", default="", help="comma-separated case names (default: all)")
    p.add_argument("--out", default=None, help="jsonl to append to (default: print only)")
    args = p.parse_args()
    if args.chunk is not None and args.clients % args.chunk:
        p.error("--clients must be a multiple of --chunk")
    rng = np.random.default_rng(0)
    host = [
        (0.05 * rng.standard_normal((args.clients, *s))).astype(np.float32)
        for s in RESNET18_KERNELS
    ]
    ks = [jnp.asarray(k) for k in host]
    want = reference(host)
    gram_flops = (
        2
        * args.clients
        * sum(min(kh * kw, ci) ** 2 * max(kh * kw, ci) * co for kh, kw, ci, co in RESNET18_KERNELS)
    )
    info = machine()
    command = "python -m benchmarks.mars_gram_forms " + " ".join(sys.argv[1:])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    only = [c for c in args.only.split(",") if c]
    for name, fn in cases().items():
        if only and name not in only:
            continue
        f = jax.jit(fn if args.chunk is None else _chunked(fn, args.chunk))
        t0 = time.perf_counter()
        out = jax.block_until_ready(f(ks))
        compile_s = time.perf_counter() - t0
        walls, cpus = [], []
        for _ in range(args.reps):
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(f(ks))
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        rec = {
            "case": "gram_form",
            "form": name,
            "clients": args.clients,
            "chunk": args.chunk,
            "channels": sum(s[-1] for s in RESNET18_KERNELS),
            "compile_s": compile_s,
            "wall_ms_per_client": 1e3 * min(walls) / args.clients,
            "cpu_ms_per_client": 1e3 * min(cpus) / args.clients,
            "gram_gflops": gram_flops / min(walls) / 1e9 if name.startswith("gram_") else None,
            "max_rel_err": None
            if name.startswith("gram_")
            else float(np.max(np.abs(np.asarray(out) - want) / want)),
            **info,
            "peak_rss_mb": peak_rss_mb(),
            "command": command,
            "date": date,
        }
        line = json.dumps(rec)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(line + "\n")


if __name__ == "__main__":
    main()
