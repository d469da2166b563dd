"""Points of a sweep that differ only along ``batch_axis``, run as one compiled program.

**Running variants together.** With ``batch_axis`` set, the points that differ only along that
axis run as ONE compiled program: the round maps ``sim.round_step`` over their stacked states
(``lax.map``; e.g. MARS's ``MarsState.epsilon`` differs), sharing the round counter, the data
and (when equal) the root key. This is only done when the variants are the same computation on
different values: their datasets and partitions must be equal and their traced rounds identical
(same jaxpr, same constants), i.e. the axis changes only values held in the state; otherwise the
points run one by one (and the log says why). Each variant then runs, one after the other inside
the program, the very round of its single run, so it takes the same decisions (sampled clients,
accepted sets, 3DFed's indicators) and gets the same numbers as ``marsjax run`` of its config
(bit for bit on CPU; ``tests/test_sweep.py`` checks it under 3DFed).

The variants are deliberately not ``vmap``-ed (as they were before): batching them batches the
convolutions, whose float rounding differs from a single run's (~1e-7 after two local steps), and
discrete choices follow the rounding. 3DFed puts its indicators on the smallest entries of an
update (``top_k`` over tiny values): on Fashion-MNIST at CPU scale (Table 8's config) the vmapped
runs chose other positions, and MARS accepted other clients, from the first round on (measured
from a random start); the Table 8 cell epsilon 0.1 x 3DFed had TPR 77.08 batched (committed),
83.33 run alone.

What batching saves is the compilation (one instead of one per variant; the data is shared), not
run time: the variants run in sequence, as separate runs would. Measured on 2 CPU cores: four
epsilon values of the test's digits federation under 3DFed (3 rounds), ``run_sweep`` 27 s batched
vs 55 s one by one (compile-bound); two epsilon values of Table 8's Fashion-MNIST config, 3
rounds: one compile of 12.5 s vs 2 x 17 s, and 32 s vs 36 s of rounds (``vmap`` took 28 s to
compile and 45 s to run). On an accelerator ``vmap`` could run the variants in parallel; its
results would not be those of single runs. A batched group has no checkpoints: if it is
interrupted, it reruns.

"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from marsjax import provenance
from marsjax.config import (
    to_dict,
)
from marsjax.sweep.grid import SweepRun
from marsjax.sweep.runfiles import _clear, _finish_run


def _stack(trees: Sequence[Any]) -> Any:
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _to_record(metrics: dict, index: int) -> dict:
    rec = {}
    for k, v in metrics.items():
        v = np.asarray(v)[index]
        if v.ndim == 0:
            x = v.item()
            rec[k] = None if isinstance(x, float) and not math.isfinite(x) else x
        else:
            rec[k] = [
                None if isinstance(e, float) and not math.isfinite(e) else e for e in v.tolist()
            ]
    return rec


def _jaxpr_key(sim, state) -> tuple[str, list]:
    import jax

    closed = jax.make_jaxpr(sim.round_step)(state, sim.data)
    return str(closed.jaxpr), [np.asarray(c) for c in closed.consts]


def _batchable(sims: Sequence[Any], states: Sequence[Any]) -> str | None:
    """Why the variants cannot run as one program (``None``: they can)."""
    import jax

    d0 = jax.tree.leaves(sims[0].data)
    for s in sims[1:]:
        d = jax.tree.leaves(s.data)
        if len(d) != len(d0) or any(
            a.shape != b.shape or not np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(d0, d)
        ):
            return "their training data or partitions differ"
    t0 = jax.tree.structure(states[0])
    shapes0 = [(x.shape, x.dtype) for x in jax.tree.leaves(states[0])]
    for st in states[1:]:
        if jax.tree.structure(st) != t0 or [(x.shape, x.dtype) for x in jax.tree.leaves(st)] != (
            shapes0
        ):
            return "their states have different structures or shapes"
    if not np.array_equal(
        np.asarray(states[0].round), np.asarray(states[-1].round)
    ):  # pragma: no cover - fresh states all start at 0
        return "they start at different rounds"
    text0, consts0 = _jaxpr_key(sims[0], states[0])
    for sim, st in zip(sims[1:], states[1:]):
        text, consts = _jaxpr_key(sim, st)
        if text != text0 or len(consts) != len(consts0):
            return "their compiled rounds differ (the axis changes the program, not only state)"
        if any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(consts, consts0)):
            return "their compiled rounds close over different constants"
    return None


def run_batched(
    runs: Sequence[SweepRun], dataset: Any, *, sims: Sequence[Any] | None = None, log=print
) -> list[dict] | None:
    """Runs ``runs`` (one grid line along the batch axis) as one compiled program.

    Returns their summaries, or ``None`` when they cannot be batched exactly (the reason is
    logged) and must run one by one.
    """
    import jax

    from marsjax import simulation
    from marsjax.simulation import RoundState

    sims = list(sims) if sims is not None else [simulation.build(r.config, dataset) for r in runs]
    if any(s.mesh is not None for s in sims):
        log("  not batched: the client axis is sharded over several devices")
        return None
    states = [s.init_state() for s in sims]
    why = _batchable(sims, states)
    if why is not None:
        log(f"  not batched: {why}")
        return None
    sim0 = sims[0]
    keys = [jax.random.key_data(s.key) for s in states]
    shared_key = all(np.array_equal(np.asarray(keys[0]), np.asarray(k)) for k in keys[1:])
    rest = _stack([tuple(s[2:]) for s in states])
    key = states[0].key if shared_key else _stack([s.key for s in states])
    rnd = states[0].round

    # The variants run one after the other inside the program (``lax.map``), each through the
    # very round of a single run. Not ``vmap``: batching the variants batches the convolutions,
    # whose float rounding then differs from a single run's, and discrete choices such as 3DFed's
    # indicator positions (the smallest entries of an update) follow it (module docstring).
    def step(rnd, key, rest, data):
        def one(xs):
            k, r = (key, xs) if shared_key else xs
            new, metrics = sim0.round_step(RoundState(rnd, k, *r), data)
            return tuple(new[2:]), metrics

        new_rest, metrics = jax.lax.map(one, rest if shared_key else (key, rest))
        return rnd + 1, new_rest, metrics

    def evaluate_all(variables, attack_state, x, y):
        return jax.lax.map(lambda v: sim0.evaluate(*v, x, y), (variables, attack_state))

    step = jax.jit(step, donate_argnums=(2,))
    evaluate = jax.jit(evaluate_all)
    cfgs = [r.config for r in runs]
    r0 = cfgs[0].run
    for r in runs:
        r.out_dir.mkdir(parents=True, exist_ok=True)
        _clear(r.out_dir)
        record = provenance.with_provenance(to_dict(r.config))
        (r.out_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    records: list[list[dict]] = [[] for _ in runs]
    t0 = time.perf_counter()
    n = len(runs)
    while int(rnd) < r0.rounds:
        rnd, rest, metrics = step(rnd, key, rest, sim0.data)
        done = int(rnd)
        host = jax.tree.map(np.asarray, metrics)  # every leaf has the variant axis first
        new = [_to_record(host, i) for i in range(n)]
        if done % r0.eval_every == 0 or done == r0.rounds:
            gv, attack_state = rest[0], rest[3]
            ev = evaluate(gv, attack_state, sim0.x_test, sim0.y_test)
            ev = {k: np.asarray(v) for k, v in ev.items()}
            for i in range(n):
                new[i].update({k: float(v[i]) for k, v in ev.items()})
        elapsed = time.perf_counter() - t0
        for i, r in enumerate(runs):
            new[i]["elapsed_s"] = elapsed
            records[i].append(new[i])
            with open(r.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(new[i]) + "\n")
        last = new[0]
        if "acc" in last:
            accs = " ".join(f"{rec['acc']:.1f}/{rec['asr']:.1f}" for rec in new)
            log(f"  round {done}/{r0.rounds} ACC/ASR {accs} ({elapsed:.0f}s)")
    wall = time.perf_counter() - t0
    return [_finish_run(c, recs, wall) for c, recs in zip(cfgs, records)]
