"""Where a run's numbers go besides ``metrics.jsonl``: a per-round CSV, TensorBoard event files
and progress on the terminal (or log lines when the output is not a terminal).

* ``metrics.csv`` (next to ``metrics.jsonl``, written by :func:`marsjax.simulation.run`): one row
  per round with the scalar columns of :data:`CSV_COLUMNS`; ``acc``/``asr``/``loss`` are empty in
  rounds that were not evaluated. The per-client lists (``client_ids``, ``accepted``, ``scores``)
  stay in ``metrics.jsonl`` only.
* TensorBoard (``marsjax run --tensorboard DIR``): :class:`TensorBoardLog` writes every scalar of
  every round as ``<tag>`` at step ``round`` (the number ``metrics.jsonl`` gives the round). It
  uses ``tensorboardX`` (pure Python; needs numpy and protobuf, not TensorFlow), an optional
  dependency: ``pip install 'marsjax[tensorboard]'``.
* :class:`Progress`: a tqdm bar when stderr is a terminal; otherwise one line every few rounds
  (about ten per run, and the last), so that a log file holds no carriage-return frames.
"""

from __future__ import annotations

import csv
import math
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["CSV_COLUMNS", "Progress", "TensorBoardLog", "append_csv", "write_csv"]

CSV_COLUMNS = (
    "round",
    "attack_active",
    "acc",
    "asr",
    "asr_excl_target",
    "loss",
    "tpr",
    "fpr",
    "tpr_excl_dropped",
    "fpr_excl_dropped",
    "num_attackers",
    "num_flagged",
    "num_dropped",
    "reverted",
    "train_loss",
    "elapsed_s",
)
# Scalars sent to TensorBoard, and their tags.
TB_TAGS = {
    "acc": "eval/acc",
    "asr": "eval/asr",
    "asr_excl_target": "eval/asr_excl_target",
    "loss": "eval/loss",
    "tpr": "detection/tpr",
    "fpr": "detection/fpr",
    "tpr_excl_dropped": "detection/tpr_excl_dropped",
    "fpr_excl_dropped": "detection/fpr_excl_dropped",
    "num_flagged": "detection/num_flagged",
    "num_dropped": "round/num_dropped",
    "train_loss": "round/train_loss",
}


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, bool):
        return int(v)
    return v


def _rows(records: Sequence[dict]) -> list[list[Any]]:
    return [[_cell(rec.get(c)) for c in CSV_COLUMNS] for rec in records]


def write_csv(path: str | pathlib.Path, records: Sequence[dict]) -> None:
    """Writes ``records`` (``metrics.jsonl`` lines) as a CSV with a header, replacing ``path``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        w.writerows(_rows(records))


def append_csv(path: str | pathlib.Path, records: Sequence[dict]) -> None:
    """Appends ``records`` to a CSV started by :func:`write_csv`."""
    with open(path, "a", newline="") as f:
        csv.writer(f).writerows(_rows(records))


class TensorBoardLog:
    """Per-round scalars as TensorBoard event files in ``logdir`` (``tensorboardX``).

    Raises:
      ImportError: ``tensorboardX`` is not installed (the message says how to get it).
    """

    def __init__(self, logdir: str | pathlib.Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "--tensorboard needs the tensorboardX package (no TensorFlow): "
                "pip install 'marsjax[tensorboard]'"
            ) from e
        pathlib.Path(logdir).mkdir(parents=True, exist_ok=True)
        self.logdir = str(logdir)
        self._writer = SummaryWriter(logdir=self.logdir, flush_secs=30)

    def write(self, records: Sequence[dict]) -> None:
        for rec in records:
            step = int(rec["round"])
            for key, tag in TB_TAGS.items():
                v = rec.get(key)
                if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if math.isfinite(v):
                    self._writer.add_scalar(tag, float(v), step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class Progress:
    """Progress of a run: a tqdm bar on a terminal, else a log line every few rounds.

    Args:
      name: the run's name (first word of each line).
      total: rounds of the run.
      initial: rounds already done (a resumed run).
      stream: where to write (default stderr); its ``isatty()`` picks the form.
      every: rounds between log lines (default: about ten lines per run).
    """

    def __init__(
        self, name: str, total: int, initial: int = 0, stream=None, every: int | None = None
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.name, self.total, self.done = name, total, initial
        self.every = every or max(1, math.ceil(total / 10))
        self._last: dict = {}
        self._t0 = time.perf_counter()
        self._bar = None
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=name, unit="round", file=self.stream
            )

    def update(self, n: int, last_eval: dict) -> None:
        before, self.done = self.done, self.done + n
        self._last = last_eval or self._last
        if self._bar is not None:
            self._bar.update(n)
            if self._last:
                self._bar.set_postfix(
                    ACC=f"{self._last['acc']:.1f}", ASR=f"{self._last['asr']:.1f}"
                )
            return
        if self.done // self.every > before // self.every or self.done >= self.total:
            ev = f", ACC {self._last['acc']:.2f}, ASR {self._last['asr']:.2f}" if self._last else ""
            print(
                f"{self.name}: round {self.done}/{self.total}{ev} "
                f"({time.perf_counter() - self._t0:.0f}s)",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
