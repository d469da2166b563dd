"""Clean pretraining: FedAvg from scratch to a target accuracy, saved as a starting checkpoint.

The paper's attack experiments do not start from a random model: the official CIFAR-10 run
resumes a clean global model trained for 200 rounds (about 85% accuracy) and attacks in the 31
rounds after it (mars_spec §2.2, §6.10). :func:`pretrain` produces such a model for any
experiment: it runs the experiment's federation (same data, partition, model, local training)
with no attack and plain FedAvg, evaluates every ``eval_every`` rounds, and stops at the first
evaluation that reaches ``target_acc`` (or after ``run.rounds`` rounds). The model is saved as an
ordinary marsjax checkpoint (:mod:`marsjax.checkpoint`) in ``out_dir/checkpoints/<round>``, and an
attack experiment starts from it with ``run.init_checkpoint = out_dir``.

``out_dir`` holds, besides the checkpoint, what :func:`marsjax.simulation.run` writes
(``config.json``, ``metrics.jsonl``) and ``pretrain.json``::

    {"rounds": 30, "acc": 85.1, "asr": 10.2, "target_acc": 85.0, "reached": true,
     "checkpoint": "checkpoints/30", "wall_s": ...}

A finished pretraining (``pretrain.json`` present, same config) is not redone; an interrupted one
resumes from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any

from marsjax.config import ConfigError, ExperimentConfig, from_dict, override, to_dict, validate

__all__ = [
    "PRETRAIN_FILE",
    "PretrainResult",
    "PretrainSpec",
    "clean_config",
    "load_result",
    "pretrain",
]

PRETRAIN_FILE = "pretrain.json"


@dataclasses.dataclass(frozen=True)
class PretrainSpec:
    """Where and how far an experiment's clean start is pretrained (used by sweeps and configs).

    Attributes:
      out_dir: results folder of the pretraining (the attack runs' ``run.init_checkpoint``).
      target_acc: stop at this test accuracy (%); ``None``: train ``max_rounds``.
      max_rounds: the most rounds.
      eval_every: evaluate and checkpoint every this many rounds.
    """

    out_dir: str
    target_acc: float | None = None
    max_rounds: int = 100
    eval_every: int = 5


@dataclasses.dataclass(frozen=True)
class PretrainResult:
    """What :func:`pretrain` reports (also written to ``out_dir/pretrain.json``).

    Attributes:
      rounds: rounds trained (the checkpoint's round).
      acc: test accuracy (%) of the saved model.
      asr: attack success rate (%) of the saved model (the clean level: about 100 / classes).
      target_acc: the accuracy asked for (``None``: train ``run.rounds`` rounds).
      reached: whether ``acc >= target_acc``.
      checkpoint: the checkpoint folder, relative to ``out_dir``.
      out_dir: the results folder (``run.init_checkpoint`` for the attack experiments).
      wall_s: seconds this call spent (0 when the pretraining was already done).
      skipped: the pretraining was found finished and not rerun.
    """

    rounds: int
    acc: float
    asr: float
    target_acc: float | None
    reached: bool
    checkpoint: str
    out_dir: str
    wall_s: float
    skipped: bool = False

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("out_dir")
        d.pop("skipped")
        return d


class _TargetReached(Exception):
    """Raised from the host loop's callback to stop at the target accuracy (after the save)."""


def clean_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` without attack and with FedAvg (options cleared), the pretraining experiment.

    The federation (``data``, ``model``, ``train``, the client sampling in ``run``) is kept, so
    the pretrained model comes from the same clients as the experiments that start from it.
    """
    return override(
        cfg,
        {
            "attack.name": "none",
            "attack.options": {},
            "attack.start_round": 0,
            "attack.stop_round": None,
            "defense.name": "fedavg",
            "defense.options": {},
        },
    )


def _saved_round(out: pathlib.Path) -> int | None:
    from marsjax import checkpoint

    if not (out / checkpoint.CHECKPOINT_SUBDIR).is_dir():
        return None
    return checkpoint.latest_round(out)


def _metrics(out: pathlib.Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_done(out: pathlib.Path, cfg: ExperimentConfig) -> PretrainResult | None:
    path = out / PRETRAIN_FILE
    if not path.exists():
        return None
    from marsjax.checkpoint import BOOKKEEPING_FIELDS, EXECUTION_FIELDS, config_diff

    saved = json.loads(path.read_text())
    diff = config_diff(saved.get("config", {}), json.loads(json.dumps(to_dict(cfg))))
    diff = [f for f in diff if f not in BOOKKEEPING_FIELDS | EXECUTION_FIELDS]
    if diff:
        raise ConfigError(
            f"{out} holds a finished pretraining of another experiment (differs in {diff}); "
            "choose another folder or delete it"
        )
    return PretrainResult(
        rounds=saved["rounds"],
        acc=saved["acc"],
        asr=saved["asr"],
        target_acc=saved["target_acc"],
        reached=saved["reached"],
        checkpoint=saved["checkpoint"],
        out_dir=str(out),
        wall_s=0.0,
        skipped=True,
    )


def pretrain(
    cfg: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    target_acc: float | None = None,
    max_rounds: int | None = None,
    eval_every: int | None = None,
    dataset: Any = None,
    progress: bool = True,
) -> PretrainResult:
    """Trains a clean FedAvg model until ``target_acc`` and saves it as a checkpoint.

    Args:
      cfg: the experiment whose federation to pretrain (its attack and defense are replaced by
        ``none`` and ``fedavg``, see :func:`clean_config`; ``run.init_checkpoint`` is kept, so a
        pretraining can itself continue from another checkpoint).
      out_dir: results folder; the checkpoint goes to ``out_dir/checkpoints/<round>``.
      target_acc: stop at the first evaluation with test accuracy (%) at least this; ``None``:
        train ``max_rounds`` rounds.
      max_rounds: the most rounds to train (default ``cfg.run.rounds``).
      eval_every: evaluate (and checkpoint) every this many rounds (default
        ``cfg.run.eval_every``).
      dataset: a preloaded dataset.
      progress: progress bar.

    Returns:
      A :class:`PretrainResult`; also written to ``out_dir/pretrain.json`` (with the config).
    """
    from marsjax import checkpoint, report, simulation

    out = pathlib.Path(out_dir)
    changes: dict[str, Any] = {"run.out_dir": str(out)}
    if max_rounds is not None:
        changes["run.rounds"] = max_rounds
    if eval_every is not None:
        changes["run.eval_every"] = eval_every
    c = clean_config(override(cfg, changes))
    c = override(c, {"run.checkpoint_every": c.run.eval_every})
    validate(c)
    if target_acc is not None and not 0.0 < target_acc <= 100.0:
        raise ConfigError(f"target_acc={target_acc!r} is invalid: must be in (0, 100]")
    done = _read_done(out, c)
    if done is not None:
        return done

    t0 = time.perf_counter()

    def reached(records: list[dict]) -> bool:
        last = records[-1] if records else {}
        return target_acc is not None and last.get("acc") is not None and last["acc"] >= target_acc

    saved = _saved_round(out)
    # An interrupted pretraining resumes; one that reached the target but died before writing
    # pretrain.json is only finalised.
    if saved is None or not reached(_metrics(out)[:saved]):

        def stop_at_target(state, records):
            if reached(records):
                raise _TargetReached  # after the checkpoint of this round was saved

        try:
            simulation.run_resumable(
                c,
                resume=saved is not None,
                dataset=dataset,
                progress=progress,
                keep=1,
                callback=stop_at_target,
            )
        except _TargetReached:
            pass
    rounds = _saved_round(out)
    records = _metrics(out)[:rounds]
    evaluated = [r for r in records if r.get("acc") is not None]
    last = evaluated[-1]
    result = PretrainResult(
        rounds=int(rounds),
        acc=float(last["acc"]),
        asr=float(last["asr"]),
        target_acc=target_acc,
        reached=target_acc is None or last["acc"] >= target_acc,
        checkpoint=f"checkpoints/{rounds}",
        out_dir=str(out),
        wall_s=time.perf_counter() - t0,
    )
    # orbax leaves commit_success.txt files that name the absolute folder; on a local disk they
    # are informative only (finished steps are told by their names), so they go: the folder can
    # be moved or committed without a machine's path in it.
    for marker in (out / checkpoint.CHECKPOINT_SUBDIR).rglob("commit_success.txt"):
        marker.unlink()
    payload = {**result.to_json(), "config": to_dict(c)}
    (out / PRETRAIN_FILE).write_text(json.dumps(payload, indent=2) + "\n")
    try:
        report.plot_curves(records, out / "curves.png", title=f"{c.name}: pretraining")
    except Exception as e:  # noqa: BLE001 (plotting must never lose a finished pretraining)
        (out / "plot_error.txt").write_text(f"{type(e).__name__}: {e}\n")
    return result


def load_result(out_dir: str | os.PathLike) -> dict:
    """``out_dir/pretrain.json`` as a dict (with its ``config`` as an ExperimentConfig)."""
    d = json.loads((pathlib.Path(out_dir) / PRETRAIN_FILE).read_text())
    d["config"] = from_dict(d["config"])
    return d
