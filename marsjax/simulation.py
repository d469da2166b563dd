"""The simulator: one compiled program per round, a thin host loop around it.

:func:`build` turns an :class:`~marsjax.config.ExperimentConfig` into a :class:`Simulation`
(dataset on the device, partition, model, attack, defense, the jitted round and evaluation).
``Simulation.round_step(state, data) -> (state, metrics)`` is ONE ``jax.jit``: it samples the
round's clients, trains all of them along the client axis, lets the attackers craft, drops
non-finite uploads, runs the defense, applies the server rule and computes the round's detection
metrics. :func:`run` is the host loop: it evaluates ACC/ASR every few rounds, logs, checkpoints
and writes the results folder.

Randomness (DESIGN principle 5): everything derives from ``run.seed``. The partition uses its own
numpy stream; the round key is ``fold_in(key(seed), round)``, split by fixed stream numbers into
sampling, training, attack and defense keys, so changing the attack does not change which
clients are sampled, and a resumed run continues identically. A client's training key is the
training key folded with its id, and the defense receives the ids of the rows: nothing depends
on the row a client lands in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from marsjax import aggregation, attacks, defenses, provenance, sharding
from marsjax.client import ClientData, make_local_train, make_normalize
from marsjax.config import ConfigError, ExperimentConfig, to_dict, validate
from marsjax.data import (
    Dataset,
    dirichlet_partition,
    iid_partition,
    load_dataset,
    pattern_trigger,
    sampled_partition,
)
from marsjax.metrics import detection_rates, make_evaluate, summarize
from marsjax.models import build_model
from marsjax.tree import row_is_finite, zero_rows
from marsjax.types import Variables

__all__ = [
    "STREAM_ATTACK",
    "STREAM_DEFENSE",
    "STREAM_SAMPLE",
    "STREAM_TRAIN",
    "RoundState",
    "Simulation",
    "build",
    "run",
    "run_clients",
    "run_resumable",
    "sample_clients",
]

STREAM_SAMPLE, STREAM_TRAIN, STREAM_ATTACK, STREAM_DEFENSE, STREAM_INIT = range(5)
_PARTITION_SALT = 0x5EED
_SERVER_SALT = 0x5E4E


class RoundState(NamedTuple):
    """Everything that changes between rounds (checkpointed as a whole).

    Attributes:
      round: int32, the next round to run (0-based).
      key: the run's root key (``jax.random.key(seed)``); round keys are folded from it.
      global_variables: the global model ``{"params", "batch_stats"?}``.
      server_opt_state: the server optimizer's state.
      defense_state: the defense's state (e.g. FoolsGold's history).
      attack_state: the attack's state (e.g. 3DFed's indicators).
    """

    round: jax.Array
    key: jax.Array
    global_variables: Variables
    server_opt_state: Any
    defense_state: Any
    attack_state: Any


# Above this pool size a round's draw without replacement uses Floyd's algorithm (O(m^2) in the m
# clients drawn; used while m^2 <= 1000 pool) instead of a permutation of the whole pool: both
# give every m-subset the same probability; below it (every paper setting) the draw is unchanged.
FLOYD_MIN_POOL = 2**16


def _choice(key: jax.Array, pool: int, m: int) -> jax.Array:
    """``m`` distinct ints of ``range(pool)``, uniformly random, in random order (static sizes)."""
    if pool <= FLOYD_MIN_POOL or m * m > 1000 * pool:  # measured: scale_clients.py, sampling
        return jax.random.choice(key, pool, (m,), replace=False)
    k_draw, k_order = jax.random.split(key)
    # Floyd: for j = pool - m .. pool - 1 draw t in [0, j]; take t unless already taken, else j
    tops = pool - m + jnp.arange(m)
    draws = jax.random.randint(k_draw, (m,), 0, tops + 1)

    def step(i, chosen):
        t = draws[i]
        return chosen.at[i].set(jnp.where(jnp.any(chosen == t), tops[i], t))

    chosen = jax.lax.fori_loop(0, m, step, jnp.full((m,), -1, draws.dtype))
    return jax.random.permutation(k_order, chosen)


def sample_clients(
    key: jax.Array,
    num_clients: int,
    num_attackers: int,
    clients_per_round: int,
    attackers_per_round: int | None,
) -> tuple[jax.Array, jax.Array]:
    """Samples a round's clients without replacement.

    Attackers are the ids ``0 .. num_attackers - 1``. With ``attackers_per_round`` set, exactly
    that many attackers and ``clients_per_round - attackers_per_round`` benign clients are drawn
    (the paper: 4 + 16); the rows are then shuffled so that no position reveals an attacker.
    A pool of more than ``FLOYD_MIN_POOL`` ids is drawn from by Floyd's algorithm (cost in the
    clients drawn, not the pool: federations of millions of registered clients).

    Returns:
      ``(client_ids int32 [m], is_malicious bool [m])``.
    """
    m = clients_per_round
    if attackers_per_round is None or num_attackers == 0:
        ids = _choice(key, num_clients, m)
    else:
        a = attackers_per_round
        k1, k2, k3 = jax.random.split(key, 3)
        mal = _choice(k1, num_attackers, a)
        ben = num_attackers + _choice(k2, num_clients - num_attackers, m - a)
        ids = jax.random.permutation(k3, jnp.concatenate([mal, ben]))
    ids = ids.astype(jnp.int32)
    return ids, ids < num_attackers


def default_client_strategy(backend: str | None = None) -> str:
    """The client-axis strategy measured fastest on ``backend`` (benchmarks/results/)."""
    backend = backend or jax.default_backend()
    return "map" if backend == "cpu" else "vmap"


def run_clients(fn: Callable, args: tuple, strategy: str, chunk: int | None = None):
    """Applies ``fn(*row)`` to every row of the stacked ``args`` along the client axis.

    ``vmap`` runs all clients as one batched program; ``map`` runs them in sequence
    (``lax.map``), ``chunk`` at a time when set. Both give the same results.
    """
    if strategy == "vmap":
        return jax.vmap(fn)(*args)
    if strategy == "map":
        return jax.lax.map(lambda a: fn(*a), args, batch_size=chunk)
    raise ValueError(f"client strategy must be 'vmap' or 'map', got {strategy!r}")


@dataclasses.dataclass
class Simulation:
    """A built experiment (host object; its functions are jitted)."""

    config: ExperimentConfig
    dataset: Dataset
    partition: Any
    model: Any
    attack: attacks.Attack
    defense: defenses.Defense
    data: ClientData
    x_test: jax.Array
    y_test: jax.Array
    round_step: Callable  # jitted: (state, data) -> (state, metrics)
    multi_round_step: Callable  # jitted: (state, data) -> (state, stacked metrics), k rounds
    evaluate: Callable  # jitted: (variables, attack_state, x, y) -> dict
    init_state: Callable[[], RoundState]
    attack_active: Callable[[int], bool]
    traces: dict  # how many times each compiled function was traced (tests: trace once)
    mesh: Any = None  # the "clients" mesh, or None on one device

    def eval_state(self, state: RoundState) -> dict:
        out = self.evaluate(state.global_variables, state.attack_state, self.x_test, self.y_test)
        return {k: float(sharding.to_host(v)) for k, v in out.items()}


def _partition(cfg: ExperimentConfig, ds: Dataset):
    seed = int(np.random.SeedSequence([cfg.run.seed, _PARTITION_SALT]).generate_state(1)[0])
    if cfg.data.partition == "iid":
        return iid_partition(ds.y_train, cfg.data.num_clients, seed, ds.num_classes)
    if cfg.data.partition == "sampled":
        k = cfg.data.samples_per_client  # more than the training set: a ValueError names it
        return sampled_partition(ds.y_train, cfg.data.num_clients, k, seed, ds.num_classes)
    return dirichlet_partition(
        ds.y_train, cfg.data.num_clients, cfg.data.dirichlet_alpha, seed, ds.num_classes
    )


def build(
    cfg: ExperimentConfig,
    dataset: Dataset | None = None,
    *,
    client_strategy: str | None = None,
    mesh: Any = "auto",
) -> Simulation:
    """Validates ``cfg`` and builds the compiled round, evaluation and initial state.

    Args:
      cfg: the experiment.
      dataset: an already-loaded dataset (tests, sweeps); loaded from ``cfg.data`` otherwise.
      client_strategy: overrides ``cfg.run.client_strategy``.
      mesh: a ``jax.sharding.Mesh`` with axis ``"clients"``, ``None`` (one device), or
        ``"auto"``: :func:`marsjax.sharding.mesh_for` over all devices if
        ``run.shard_clients``.
    """
    validate(cfg)
    d, r, a, t = cfg.data, cfg.run, cfg.attack, cfg.train
    ds = dataset if dataset is not None else load_dataset(d.name, d.data_dir, d.source)
    part = _partition(cfg, ds)
    model = build_model(
        cfg.model.name,
        ds.num_classes,
        batch_norm=cfg.model.batch_norm,
        conv_impl=cfg.model.conv_impl,
        stem=cfg.model.stem,
        width=cfg.model.width,
    )
    normalize = make_normalize(ds.mean, ds.std)
    trigger = pattern_trigger(ds.image_shape, a.trigger_top, a.trigger_left)
    m = r.clients_per_round
    # Attackers are sampled as configured even with attack "none" (they then train honestly), so
    # that changing the attack never changes which clients a round samples.
    num_attackers = a.num_attackers
    apr = a.attackers_per_round if num_attackers else None
    if apr is None:
        expected_attackers = round(m * num_attackers / d.num_clients)
    else:
        expected_attackers = apr
    has_attack = a.name != "none" and num_attackers > 0
    if not has_attack:
        expected_attackers = 0

    actx = attacks.AttackContext(
        model=model,
        normalize=normalize,
        train=t,
        target_label=a.target_label,
        poison_fraction=a.poison_fraction,
        trigger=trigger,
        num_classes=ds.num_classes,
        image_shape=ds.image_shape,
        num_clients=d.num_clients,
        num_attackers=num_attackers,
        clients_per_round=m,
        attackers_per_round=expected_attackers,
        dataset=ds,
    )
    attack = attacks.make(a.name, actx, **a.options)
    server_data = None
    if d.server_samples:
        seed = int(np.random.SeedSequence([r.seed, _SERVER_SALT]).generate_state(1)[0])
        pick = np.random.default_rng(seed).choice(
            len(ds.y_train), min(d.server_samples, len(ds.y_train)), replace=False
        )
        server_data = (ds.x_train[np.sort(pick)], ds.y_train[np.sort(pick)])
    dctx = defenses.DefenseContext(
        model=model,
        num_clients=d.num_clients,
        clients_per_round=m,
        attackers_per_round=expected_attackers,
        num_classes=ds.num_classes,
        image_shape=ds.image_shape,
        normalize=normalize,
        server_rule=r.server_rule,
        server_lr=r.server_lr,
        eta=r.eta,
        train=t,
        server_data=server_data,
    )
    defense = defenses.make(cfg.defense.name, dctx, **cfg.defense.options)

    def batch_fn(key, x, y, aux):
        flag, attack_state = aux
        px, py = attack.poison(key, x, y, attack_state)
        return jnp.where(flag, px, x), jnp.where(flag, py, y)

    local_train = make_local_train(
        model,
        normalize,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        batch_size=t.batch_size,
        epochs=t.local_epochs,
        steps=t.local_steps,
        drop_last=t.drop_last,
        batch_fn=batch_fn if a.name != "none" else None,
    )
    strategy = client_strategy or r.client_strategy
    if strategy == "auto":
        strategy = default_client_strategy()
    server_opt = aggregation.server_optimizer()
    start, stop = a.start_round, a.stop_round if a.stop_round is not None else 2**31 - 1

    traces = {"round": 0}

    if isinstance(mesh, str):
        mesh = sharding.mesh_for(m) if r.shard_clients else None

    def train_block(keys, idx, counts, flags, g, attack_state, data):
        def client(key, idx_row, count, flag):
            return local_train(g, key, data, idx_row, count, (flag, attack_state))

        return run_clients(client, (keys, idx, counts, flags), strategy, r.client_chunk)

    if mesh is not None:
        spec_c, spec_r = sharding.P(sharding.CLIENTS), sharding.P()
        train_block = jax.shard_map(
            train_block,
            mesh=mesh,
            in_specs=(spec_c, spec_c, spec_c, spec_c, spec_r, spec_r, spec_r),
            out_specs=spec_c,
            check_vma=False,
        )

    def one_round(state: RoundState, data: ClientData):
        traces["round"] += 1  # Python side effect: runs at trace time only
        rnd = state.round
        base = jax.random.fold_in(state.key, rnd)
        k_sample, k_train, k_attack, k_defense = (
            jax.random.fold_in(base, s)
            for s in (STREAM_SAMPLE, STREAM_TRAIN, STREAM_ATTACK, STREAM_DEFENSE)
        )
        ids, is_mal = sample_clients(k_sample, d.num_clients, num_attackers, m, apr)
        active = (rnd >= start) & (rnd < stop) & has_attack
        is_attacking = is_mal & active
        idx = data.indices[ids]
        counts = data.counts[ids]
        g = state.global_variables
        # A client's training key follows its id, not its row (rows are shuffled every round).
        keys = jax.vmap(lambda i: jax.random.fold_in(k_train, i))(ids)
        trained, losses = train_block(keys, idx, counts, is_attacking, g, state.attack_state, data)
        updates = jax.tree.map(lambda n, g0: n - g0[None], trained, g)

        cctx = attacks.CraftContext(g, rnd, ids, is_attacking, data, counts)
        if has_attack:
            updates, attack_state = jax.lax.cond(
                active & jnp.any(is_attacking),
                lambda u, s: attack.craft(k_attack, u, s, cctx),
                lambda u, s: (u, s),
                updates,
                state.attack_state,
            )
        else:
            attack_state = state.attack_state

        # Drop uploads with non-finite entries, and finite ones so large that their float32
        # squared norm overflows (e.g. 1e30 entries): no statistic can use them safely.
        sq_norm = sum(
            jnp.sum(jnp.square(u.reshape(u.shape[0], -1)), axis=1) for u in jax.tree.leaves(updates)
        )
        finite = row_is_finite(updates) & jnp.isfinite(sq_norm)
        if r.weighting == "num_samples":
            weights = counts.astype(jnp.float32)
        else:
            weights = jnp.ones((m,), jnp.float32)
        weights = jnp.where(finite, weights, 0.0)
        updates = zero_rows(updates, finite)
        result, defense_state = defense.apply(
            k_defense,
            updates,
            state.defense_state,
            global_variables=g,
            client_weights=weights,
            client_ids=ids,
        )
        accepted = jnp.where(finite, result.accepted, 0.0)
        scale = aggregation.rule_scale(
            r.server_rule,
            jnp.sum(accepted * (weights > 0)),
            server_lr=r.server_lr,
            eta=r.eta,
            num_clients=d.num_clients,
        )
        new_g, opt_state = aggregation.apply_update(
            g, result.update, scale, server_opt, state.server_opt_state
        )
        ok = aggregation.tree_all_finite(new_g)
        new_g = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_g, g)
        opt_state = jax.tree.map(
            lambda n, o: jnp.where(ok, n, o), opt_state, state.server_opt_state
        )
        tpr, fpr = detection_rates(accepted, is_attacking)
        tpr_judged, fpr_judged = detection_rates(accepted, is_attacking, counted=finite)
        benign = ~is_attacking
        metrics = {
            "round": rnd,
            "attack_active": active,
            "tpr": tpr,
            "fpr": fpr,
            "tpr_excl_dropped": tpr_judged,
            "fpr_excl_dropped": fpr_judged,
            "num_attackers": jnp.sum(is_attacking).astype(jnp.int32),
            "num_flagged": jnp.sum(accepted <= 0.5).astype(jnp.int32),
            "num_dropped": jnp.sum(~finite).astype(jnp.int32),
            "reverted": (~ok).astype(jnp.int32),
            "train_loss": jnp.sum(jnp.where(benign, losses, 0.0)) / jnp.maximum(jnp.sum(benign), 1),
            "client_ids": ids,
            "is_attacking": is_attacking,
            "accepted": accepted,
            "dropped": ~finite,
            "scores": result.scores,
        }
        new_state = RoundState(rnd + 1, state.key, new_g, opt_state, defense_state, attack_state)
        if mesh is not None:  # what leaves the round is replicated: every process can read it
            new_state, metrics = jax.lax.with_sharding_constraint(
                (new_state, metrics), sharding.replicated(mesh)
            )
        return new_state, metrics

    round_step = jax.jit(one_round, donate_argnums=(0,))
    k = r.rounds_per_call

    def k_rounds(state, data):
        return jax.lax.scan(lambda s, _: one_round(s, data), state, None, length=k)

    multi_round_step = jax.jit(k_rounds, donate_argnums=(0,))

    data = sharding.put_replicated(
        ClientData(ds.x_train, ds.y_train, part.indices, part.counts), mesh
    )
    if mesh is None:
        data = ClientData(*(jnp.asarray(x) for x in data))
    evaluate = make_evaluate(
        model,
        normalize,
        attack.trigger,
        a.target_label,
        r.eval_batch_size,
        asr_images=attack.asr_images,
    )

    def init_state() -> RoundState:
        root = jax.random.key(r.seed)
        x0 = jnp.zeros((1, *ds.image_shape), jnp.float32)
        variables = dict(model.init(jax.random.fold_in(root, STREAM_INIT), x0))
        if r.init_checkpoint:
            from marsjax import checkpoint

            variables = checkpoint.load_variables(r.init_checkpoint, like=variables)
        state = RoundState(
            jnp.int32(0),
            root,
            variables,
            server_opt.init(variables["params"]),
            defense.init(variables),
            attack.init(variables),
        )
        return sharding.put_replicated(state, mesh)

    return Simulation(
        config=cfg,
        dataset=ds,
        partition=part,
        model=model,
        attack=attack,
        defense=defense,
        data=data,
        x_test=sharding.put_replicated(jnp.asarray(ds.x_test), mesh),
        y_test=sharding.put_replicated(jnp.asarray(ds.y_test), mesh),
        round_step=round_step,
        multi_round_step=multi_round_step,
        evaluate=evaluate,
        init_state=init_state,
        attack_active=lambda i: bool(has_attack and start <= i < stop),
        traces=traces,
        mesh=mesh,
    )


# ------------------------------------------------------------------------------------------------
# Host loop


def _round_of(state: RoundState) -> int:
    return int(sharding.to_host(state.round))


def _to_record(metrics: dict, index: int | None = None) -> dict:
    rec = {}
    for k, v in metrics.items():
        v = sharding.to_host(v)
        v = v if index is None else v[index]
        if v.ndim == 0:
            x = v.item()
            if isinstance(x, float) and not math.isfinite(x):
                x = None
            rec[k] = x
        else:
            rec[k] = [
                None if isinstance(e, float) and not math.isfinite(e) else e for e in v.tolist()
            ]
    return rec


def run(
    cfg: ExperimentConfig,
    *,
    dataset: Dataset | None = None,
    progress: bool = True,
    sim: Simulation | None = None,
    state: RoundState | None = None,
    records: list[dict] | None = None,
    callback: Callable[[RoundState, list[dict]], None] | None = None,
    tensorboard: str | pathlib.Path | None = None,
) -> dict:
    """Runs ``cfg`` to the end and returns ``{"summary", "records", "state", "sim"}``.

    Writes, when ``cfg.run.out_dir`` is set: ``config.json`` (resolved), ``metrics.jsonl`` (one
    line per round), ``metrics.csv`` (its scalar columns, :mod:`marsjax.run_logs`),
    ``summary.json``, ``summary.md`` and ``curves.png``. ``metrics.jsonl`` and ``metrics.csv``
    start from ``records`` (empty for a fresh run): a folder never mixes the rounds of two runs.
    ``config.json`` and ``summary.json`` record where the result came from
    (:mod:`marsjax.provenance`: ``commit``, ``dirty``, package versions, the command).

    Args:
      cfg: the experiment.
      dataset: a preloaded dataset.
      progress: show progress with round / ACC / ASR: a bar on a terminal, else a log line every
        few rounds (:class:`marsjax.run_logs.Progress`).
      sim, state, records: continue an existing simulation (resume).
      callback: called after every host step with the state and records so far (checkpointing).
      tensorboard: also write every round's scalars as TensorBoard event files in this folder.
    """
    from marsjax import run_logs

    sim = sim or build(cfg, dataset)
    state = state if state is not None else sim.init_state()
    records = list(records or [])
    r = cfg.run
    out = pathlib.Path(r.out_dir) if r.out_dir else None
    prov = provenance.provenance()
    if out:
        out.mkdir(parents=True, exist_ok=True)
        record = provenance.with_provenance(to_dict(cfg), prov)
        (out / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        with open(out / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(rec) + "\n" for rec in records)
        run_logs.write_csv(out / "metrics.csv", records)
    tb = run_logs.TensorBoardLog(tensorboard) if tensorboard else None
    bar = run_logs.Progress(cfg.name, r.rounds, _round_of(state)) if progress else None
    t0 = time.perf_counter()
    last_eval: dict = {}
    while _round_of(state) < r.rounds:
        left = r.rounds - _round_of(state)
        if r.rounds_per_call > 1 and left >= r.rounds_per_call:
            state, stacked = sim.multi_round_step(state, sim.data)
            new = [_to_record(stacked, i) for i in range(r.rounds_per_call)]
        else:
            state, metrics = sim.round_step(state, sim.data)
            new = [_to_record(metrics)]
        done = _round_of(state)
        if done % r.eval_every == 0 or done == r.rounds or r.rounds_per_call > 1:
            last_eval = sim.eval_state(state)
            new[-1].update(last_eval)
        new[-1]["elapsed_s"] = time.perf_counter() - t0
        records.extend(new)
        if out:
            with open(out / "metrics.jsonl", "a") as f:
                f.writelines(json.dumps(rec) + "\n" for rec in new)
            run_logs.append_csv(out / "metrics.csv", new)
        if tb is not None:
            tb.write(new)
        if bar is not None:
            bar.update(len(new), last_eval)
        if callback is not None:
            callback(state, records)
    if bar is not None:
        bar.close()
    if tb is not None:
        tb.close()
    summary = summarize(
        records,
        attack_active=cfg.attack.name != "none",
        detects=cfg.defense.name not in defenses.NO_DETECTION,
    )
    summary["name"] = cfg.name
    summary["attack"] = cfg.attack.name
    summary["defense"] = cfg.defense.name
    summary["seed"] = r.seed
    summary["rounds"] = _round_of(state)
    summary["wall_s"] = time.perf_counter() - t0
    summary = provenance.with_provenance(summary, prov)
    if out:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        from marsjax import report

        (out / "summary.md").write_text(report.summary_markdown([summary]))
        try:
            report.plot_curves(records, out / "curves.png", title=report.curves_title(cfg))
        except Exception as e:  # noqa: BLE001 - plotting must never lose a finished run
            (out / "plot_error.txt").write_text(f"{type(e).__name__}: {e}\n")
    return {"summary": summary, "records": records, "state": state, "sim": sim}


def run_resumable(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    dataset: Any = None,
    progress: bool = True,
    directory: str | os.PathLike | None = None,
    keep: int = 2,
    callback: Callable[[Any, list[dict]], None] | None = None,
    sim: Any = None,
    tensorboard: str | os.PathLike | None = None,
    on_resume: Callable[[int, list[tuple[int, str]]], None] | None = None,
) -> dict:
    """:func:`run` with checkpoints every ``run.checkpoint_every`` rounds.

    Args:
      cfg: the experiment; checkpoints go to ``directory`` or ``run.out_dir/checkpoints``.
      resume: continue from the latest checkpoint (which must exist and match ``cfg``);
        otherwise the checkpoint folder must hold no checkpoint (a fresh run never mixes with an
        old one) and ``metrics.jsonl`` starts empty.
      dataset: a preloaded dataset.
      progress: progress bar.
      directory: the checkpoint folder (default ``run.out_dir/checkpoints``).
      keep: checkpoints kept (the latest ones).
      callback: also called after every host step, after the checkpoint (tests, monitoring).
      sim: an already built :class:`~marsjax.simulation.Simulation` of the same experiment
        (its compiled functions are reused; ``cfg`` may differ in bookkeeping fields only).
      tensorboard: TensorBoard event folder (:func:`marsjax.simulation.run`).
      on_resume: called with ``(round, skipped)`` once a checkpoint is restored (``skipped``:
        ``(round, reason)`` of the newer unreadable steps passed over); the skipped steps are
        then not also warned about.

    Returns:
      What :func:`marsjax.simulation.run` returns, plus ``"resumed_from"`` (a round or None).
    """
    from marsjax.checkpoint import (
        BOOKKEEPING_FIELDS,
        CHECKPOINT_SUBDIR,
        Checkpointer,
        CheckpointError,
        config_diff,
        rewrite_metrics,
    )

    r = cfg.run
    if directory is None and r.out_dir:
        directory = pathlib.Path(r.out_dir) / CHECKPOINT_SUBDIR
    if sim is not None:
        diff = config_diff(to_dict(sim.config), to_dict(cfg))
        if any(f not in BOOKKEEPING_FIELDS for f in diff):
            raise ValueError(f"sim was built for another config (differs in {diff})")
    if not resume and r.checkpoint_every == 0:
        out = run(
            cfg,
            dataset=dataset,
            progress=progress,
            sim=sim,
            callback=callback,
            tensorboard=tensorboard,
        )
        return {**out, "resumed_from": None}
    if directory is None:
        raise ConfigError(
            f"run.out_dir=None is invalid: checkpoints (run.checkpoint_every="
            f"{r.checkpoint_every}, resume={resume}) need a results folder"
        )
    sim = sim or build(cfg, dataset)
    ckpt = Checkpointer(directory, cfg, dataset=sim.dataset, keep=keep)
    try:
        state = records = None
        resumed_from = None
        if resume:
            state, records = ckpt.restore(sim.init_state(), warn_skipped=on_resume is None)
            resumed_from = len(records)
            if on_resume is not None:
                on_resume(resumed_from, list(ckpt.skipped))
        elif ckpt.latest_round() is not None:
            raise CheckpointError(
                f"{directory} already holds checkpoints (up to round {ckpt.latest_round()}) of "
                "an earlier run: resume it (--resume) or choose another run.out_dir"
            )
        if r.out_dir:
            rewrite_metrics(r.out_dir, records or [])

        def on_step(s, recs):
            ckpt(s, recs)
            if callback is not None:
                callback(s, recs)

        out = run(
            cfg,
            sim=sim,
            state=state,
            records=records,
            callback=on_step,
            progress=progress,
            tensorboard=tensorboard,
        )
    finally:
        ckpt.close()
    return {**out, "resumed_from": resumed_from}
