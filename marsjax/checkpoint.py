"""Checkpoints: the whole round state and the metrics so far, saved atomically, resumed exactly.

A run with ``run.checkpoint_every = k`` and a results folder saves, every ``k`` rounds and after
the last one, everything a resumed run needs to continue as if it had never stopped:

.. code-block:: text

    out_dir/
      config.json  metrics.jsonl  ...     written by marsjax.simulation.run
      checkpoints/
        <round>/                          one orbax step per saved round (the latest ``keep``)
          state/     every leaf of the RoundState (round, root key, global model, server optimizer,
                     defense state, attack state); PRNG keys are stored as their key data
          meta/      JSON: format, round, resolved config, fingerprints, leaf paths/shapes/dtypes
          records/   JSON: the per-round records of rounds 0 .. round - 1
        _trash/                           old steps are renamed here before they are deleted

**Atomicity** (orbax 0.12, checked by ``tests/test_checkpoint.py``): a step is written into
``<round>.orbax-checkpoint-tmp-<timestamp>/`` and becomes ``<round>/`` by one ``rename`` after all
of its items are written (``AtomicRenameTemporaryPath`` on local disks). A process killed while it
saves leaves only the temporary folder, which orbax never lists and removes when the folder is
opened again, so the previous checkpoint stays the latest. Old steps are first renamed into
``_trash`` (``todelete_subdir``), so a kill while deleting never leaves a half-deleted step that
looks complete. Saves are synchronous: when the host loop's callback returns, the step is on disk.
The guarantee covers a killed process, not a power cut (orbax does not ``fsync``).

**Resume** (:func:`marsjax.simulation.run_resumable`, ``marsjax run --resume DIR``): the latest step is restored into
the structure of a freshly built state, the saved config is compared with the current one and
``metrics.jsonl`` is cut back to the checkpoint's records, so that the resumed run ends with the
metrics, ``metrics.jsonl`` lines (up to the wall-clock ``elapsed_s``) and final model of an
uninterrupted run, bit for bit on the same machine. A checkpoint is refused, naming the fields,
when the configs differ in anything that changes the results. Allowed to differ:

* bookkeeping (:data:`BOOKKEEPING_FIELDS`): ``name``, ``run.rounds`` (extend a run; not below the
  checkpoint's round), ``run.out_dir``, ``run.checkpoint_every``, ``run.eval_every``,
  ``data.data_dir`` and ``data.source`` (the dataset itself is compared by a fingerprint of its
  arrays);
* execution (:data:`EXECUTION_FIELDS`): how the same computation runs (``run.client_strategy``,
  ``run.client_chunk``, ``run.rounds_per_call``, ``run.shard_clients``, ``run.eval_batch_size``,
  ``model.conv_impl``). These change results only to float tolerance, as running on another
  number of devices does (DESIGN principle 5); a warning says so.

:func:`load_variables` reads only the global model of a checkpoint (``run.init_checkpoint``:
start an attack experiment from a clean pretrained model), checked against the expected tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import sys
import warnings
from collections.abc import Sequence
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np

from marsjax.config import ExperimentConfig, to_dict

__all__ = [
    "BOOKKEEPING_FIELDS",
    "EXECUTION_FIELDS",
    "FORMAT_VERSION",
    "CheckpointError",
    "Checkpointer",
    "check_resumable",
    "config_diff",
    "dataset_fingerprint",
    "find_checkpoint_dir",
    "fingerprint",
    "latest_round",
    "load_variables",
    "read_meta",
    "rewrite_metrics",
]

FORMAT = "marsjax-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_SUBDIR = "checkpoints"
_TRASH = "_trash"
_ITEMS = ("state", "meta", "records")

BOOKKEEPING_FIELDS = frozenset(
    {
        "name",
        "run.rounds",
        "run.out_dir",
        "run.checkpoint_every",
        "run.eval_every",
        "data.data_dir",
        "data.source",
    }
)
EXECUTION_FIELDS = frozenset(
    {
        "run.client_strategy",
        "run.client_chunk",
        "run.rounds_per_call",
        "run.shard_clients",
        "run.eval_batch_size",
        "model.conv_impl",
    }
)
# Fields added after results were committed, with the value that reproduces the earlier behaviour:
# a saved config without the field and a config holding that value describe the same experiment.
ADDED_FIELDS: dict[str, Any] = {"data.samples_per_client": None}


def _drop_added_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flat.items() if k not in ADDED_FIELDS or v != ADDED_FIELDS[k]}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or belongs to another experiment (the message says)."""


# ------------------------------------------------------------------------------------------------
# Configs and fingerprints


def _canonical(obj: Any) -> Any:
    """JSON-normal form (tuples become lists, keys strings; key order kept), as it reads back."""
    return json.loads(json.dumps(obj, default=str))


def _flatten_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten_dict(v, name))
        else:
            out[name] = v
    return out


def config_diff(saved: dict, current: dict) -> list[str]:
    """Dotted names of the fields that differ between two config dicts (options included).

    >>> config_diff({"run": {"seed": 0, "rounds": 5}}, {"run": {"seed": 1, "rounds": 5}})
    ['run.seed']

    The provenance a results folder's ``config.json`` carries (``commit``, ``dirty``,
    ``provenance``: :mod:`marsjax.provenance`) is not part of the config and is ignored.
    """
    from marsjax.provenance import PROVENANCE_KEYS

    saved, current = (
        {k: v for k, v in d.items() if k not in PROVENANCE_KEYS} if isinstance(d, dict) else d
        for d in (saved, current)
    )
    a, b = (_drop_added_defaults(_flatten_dict(_canonical(d))) for d in (saved, current))
    same = lambda x, y: json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)
    return sorted(k for k in set(a) | set(b) if k not in a or k not in b or not same(a[k], b[k]))


def _is_allowed(field: str) -> bool:
    return field in BOOKKEEPING_FIELDS or field in EXECUTION_FIELDS


def fingerprint(cfg: ExperimentConfig | dict) -> str:
    """SHA-256 of the fields that define the results (all but bookkeeping and execution fields).

    Two configs with the same fingerprint run the same experiment; a checkpoint records it.
    """
    d = _canonical(to_dict(cfg) if isinstance(cfg, ExperimentConfig) else cfg)
    flat = {k: v for k, v in _drop_added_defaults(_flatten_dict(d)).items() if not _is_allowed(k)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def dataset_fingerprint(dataset: Any) -> str:
    """BLAKE2 digest of a dataset's arrays (train and test images and labels, with shapes)."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        a = np.ascontiguousarray(np.asarray(getattr(dataset, name)))
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def check_resumable(saved: dict, cfg: ExperimentConfig, saved_round: int) -> list[str]:
    """Checks that a checkpoint saved under config ``saved`` may continue as ``cfg``.

    Args:
      saved: the checkpoint's config (``to_dict`` form).
      cfg: the config of the run that resumes.
      saved_round: the checkpoint's round (``run.rounds`` may not go below it).

    Returns:
      Warnings for execution fields that differ (results match to float tolerance only).

    Raises:
      CheckpointError: naming every differing field that changes the results.
    """
    diff = config_diff(saved, to_dict(cfg))
    bad = [f for f in diff if not _is_allowed(f)]
    if bad:
        flat_a, flat_b = _flatten_dict(_canonical(saved)), _flatten_dict(_canonical(to_dict(cfg)))
        lines = [
            f"  {f}: checkpoint {flat_a.get(f, '<absent>')!r}, now {flat_b.get(f, '<absent>')!r}"
            for f in bad
        ]
        raise CheckpointError(
            "the checkpoint belongs to a different experiment; these fields differ:\n"
            + "\n".join(lines)
            + "\nrun with the checkpoint's values (--set FIELD=VALUE) or start a new run.out_dir"
        )
    if cfg.run.rounds < saved_round:
        raise CheckpointError(
            f"run.rounds={cfg.run.rounds} is below the checkpoint's round {saved_round}"
        )
    return [
        f"{f} differs from the checkpoint's: the resumed run matches an uninterrupted one to "
        "float tolerance, not bit for bit"
        for f in diff
        if f in EXECUTION_FIELDS
    ]


# ------------------------------------------------------------------------------------------------
# Pytree <-> flat leaves


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _host_int(x: Any) -> int:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return int(np.asarray(x))


def _leaf_name(i: int) -> str:
    return f"l{i:05d}"


def _describe(tree: Any) -> tuple[list[dict], list[Any], Any]:
    """Leaf metadata (path, shape, dtype, key impl), the storable leaves and the treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    meta, leaves = [], []
    for path, leaf in flat:
        entry = {"path": jax.tree_util.keystr(path)}
        if _is_key(leaf):
            entry["key_impl"] = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        elif not isinstance(leaf, (jax.Array, np.ndarray)):
            leaf = np.asarray(leaf)
        entry["shape"] = list(leaf.shape)
        entry["dtype"] = np.dtype(leaf.dtype).name
        meta.append(entry)
        leaves.append(leaf)
    return meta, leaves, treedef


def _match_leaves(saved: list[dict], expected: list[dict], what: str) -> None:
    """Raises a CheckpointError naming missing, unexpected and mismatched leaves."""
    s = {e["path"]: e for e in saved}
    x = {e["path"]: e for e in expected}
    problems = []
    missing = [p for p in x if p not in s]
    extra = [p for p in s if p not in x]
    if missing:
        problems.append(f"missing from the checkpoint: {_short(missing)}")
    if extra:
        problems.append(f"in the checkpoint but not expected: {_short(extra)}")
    for p, b in x.items():
        if p in s:
            a = s[p]
            if (a["shape"], a["dtype"], a.get("key_impl")) != (
                b["shape"],
                b["dtype"],
                b.get("key_impl"),
            ):
                problems.append(
                    f"{p}: checkpoint {a.get('key_impl') or a['dtype']}{a['shape']}, expected "
                    f"{b.get('key_impl') or b['dtype']}{b['shape']}"
                )
    if problems:
        raise CheckpointError(f"{what} does not match:\n  " + "\n  ".join(problems))


def _short(items: Sequence[str], n: int = 6) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _abstract(leaf: Any, meta: dict) -> jax.ShapeDtypeStruct:
    sharding = None
    if isinstance(leaf, jax.Array) and "key_impl" not in meta:
        sharding = leaf.sharding
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(tuple(meta["shape"]), np.dtype(meta["dtype"]), sharding=sharding)


def _rebuild(value: Any, like: Any, meta: dict) -> Any:
    """A restored leaf of the kind of ``like``: a Python scalar or numpy array as such; a JAX array
    with the same sharding, committed only if ``like`` is (an uncommitted input where the
    compiled round saw a committed one would recompile it)."""
    if isinstance(like, (bool, int, float, complex)):
        return type(like)(np.asarray(value).item())
    if isinstance(like, (np.ndarray, np.generic)):
        return np.asarray(value).astype(like.dtype)
    if isinstance(like, jax.Array) and not getattr(like, "committed", True):
        value = jnp.asarray(np.asarray(value))
    if "key_impl" in meta:
        value = jax.random.wrap_key_data(jnp.asarray(value), impl=meta["key_impl"])
    if isinstance(like, jax.Array) and getattr(like, "committed", True):
        value = jax.device_put(value, like.sharding)
    return value


# ------------------------------------------------------------------------------------------------
# The manager


def _reason(e: BaseException, limit: int = 160) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (TensorStore errors carry
    a whole JSON spec)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" [tensorstore_spec")[0]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def _quiet_stderr(grace_s: float = 0.0):
    """Drops what is written to file descriptor 2 (TensorStore's and absl's C++ logs, Python's
    stderr) while a step that may be corrupt is read. When the read fails, TensorStore may still
    finish the reads of the step's other arrays and print a traceback for each (dozens of lines,
    ``Event loop is closed``); ``grace_s`` keeps stderr quiet that much longer after a failure so
    that they land here too."""
    import tempfile
    import time

    sys.stderr.flush()
    try:
        fd = sys.stderr.fileno()
        saved = os.dup(fd)
    except (AttributeError, OSError, ValueError):  # no real descriptor (some test harnesses)
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            yield
        except BaseException:
            time.sleep(grace_s)
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)


def find_checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
    """``path`` itself, or its ``checkpoints/`` subfolder when ``path`` is a results folder."""
    p = pathlib.Path(path)
    if (p / CHECKPOINT_SUBDIR).is_dir():
        return p / CHECKPOINT_SUBDIR
    return p


def _manager(directory: pathlib.Path, keep: int, read_only: bool = False):
    """An orbax manager; ``read_only`` managers create, clean and delete nothing (never save)."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only,
        todelete_subdir=_TRASH,
        create=not read_only,
    )
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=_ITEMS)


def _restore_items(mgr, step: int, abstract: dict | None, names: Sequence[str]) -> Any:
    import orbax.checkpoint as ocp

    args = {}
    if "state" in names:
        args["state"] = ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        )
    for n in ("meta", "records"):
        if n in names:
            args[n] = ocp.args.JsonRestore()
    return mgr.restore(step, args=ocp.args.Composite(**args))


def _read_meta(mgr, step: int, directory: pathlib.Path) -> dict:
    meta = _restore_items(mgr, step, None, ("meta",)).meta
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory}/{step} is not a marsjax checkpoint")
    if meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory}/{step}: checkpoint format version {meta.get('version')}, this marsjax "
            f"reads version {FORMAT_VERSION}"
        )
    return meta


class Checkpointer:
    """Saves and restores a run's :class:`~marsjax.simulation.RoundState` and records.

    Use it as the host loop's callback: ``simulation.run(cfg, callback=Checkpointer(dir, cfg))``
    saves whenever a multiple of ``every`` rounds has been crossed and after the last round.

    Args:
      directory: the checkpoint folder (``out_dir/checkpoints``); created on the first save.
      cfg: the run's config (saved with every step, compared on restore).
      dataset: the run's dataset (its fingerprint is saved and compared); optional.
      every: save every this many rounds (default ``cfg.run.checkpoint_every``; 0: only the last
        round).
      keep: how many of the latest steps to keep.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        cfg: ExperimentConfig,
        *,
        dataset: Any = None,
        every: int | None = None,
        keep: int = 2,
    ):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = pathlib.Path(directory)
        self.cfg = cfg
        self.every = cfg.run.checkpoint_every if every is None else every
        self.keep = keep
        self._dataset = dataset
        self._dataset_fp: str | None = None
        self._mgr = None
        self._last_saved: int | None = None
        self.skipped: list[tuple[int, str]] = []  # (round, reason) of unreadable steps skipped

    # -- plumbing
    def _get_manager(self):
        if self._mgr is None:
            self._mgr = _manager(self.directory, self.keep)
            self._empty_trash()
        return self._mgr

    def _empty_trash(self) -> None:
        shutil.rmtree(self.directory / _TRASH, ignore_errors=True)

    def _dataset_fingerprint(self) -> str | None:
        if self._dataset is None:
            return None
        if self._dataset_fp is None:
            self._dataset_fp = dataset_fingerprint(self._dataset)
        return self._dataset_fp

    def close(self) -> None:
        if self._mgr is not None:
            self._mgr.close()
            self._mgr = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- queries
    def rounds(self) -> list[int]:
        """The saved rounds, oldest first (finished steps only)."""
        if not self.directory.is_dir():
            return []
        return list(self._get_manager().all_steps())

    def latest_round(self) -> int | None:
        r = self.rounds()
        return r[-1] if r else None

    # -- save
    def save(self, state: Any, records: Sequence[dict]) -> int:
        """Saves ``state`` (a RoundState) and ``records`` as the step ``state.round``."""
        import orbax.checkpoint as ocp

        rnd = _host_int(state.round)
        if len(records) != rnd:
            raise CheckpointError(f"round {rnd} with {len(records)} records: they must match")
        leaves_meta, leaves, _ = _describe(state)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "round": rnd,
            "config": _canonical(to_dict(self.cfg)),
            "fingerprint": fingerprint(self.cfg),
            "dataset": {
                "name": self.cfg.data.name,
                "fingerprint": self._dataset_fingerprint(),
            },
            "leaves": leaves_meta,
            "versions": _versions(),
        }
        tree = {_leaf_name(i): leaf for i, leaf in enumerate(leaves)}
        mgr = self._get_manager()
        if rnd in mgr.all_steps():  # a stale step (an unreadable one that restore skipped)
            mgr.delete(rnd)
        mgr.save(
            rnd,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(tree),
                meta=ocp.args.JsonSave(meta),
                records=ocp.args.JsonSave(_canonical(list(records))),
            ),
            force=True,
        )
        mgr.wait_until_finished()
        self._empty_trash()
        self._last_saved = rnd
        return rnd

    def __call__(self, state: Any, records: Sequence[dict]) -> None:
        """The host loop's callback: saves when a multiple of ``every`` was crossed or at the end."""
        rnd = _host_int(state.round)
        last = self._last_saved if self._last_saved is not None else 0
        crossed = self.every > 0 and rnd // self.every > last // self.every
        if crossed or rnd >= self.cfg.run.rounds:
            self.save(state, records)

    # -- restore
    def restore(
        self,
        like: Any,
        *,
        round: int | None = None,
        check_config: bool = True,
        warn_skipped: bool = True,
    ) -> tuple[Any, list[dict]]:
        """Restores a step into the structure of ``like`` (a freshly built RoundState).

        Args:
          like: a state with the expected tree, shapes, dtypes and shardings
            (``sim.init_state()``).
          round: the step to restore (default: the latest readable one; if the latest cannot be
            read, the previous ones are tried). The skipped steps are in ``self.skipped``
            (round, one-line reason); what the storage libraries print while a step is read
            (dozens of lines for a corrupt one) is dropped.
          check_config: refuse a checkpoint of a different experiment (:func:`check_resumable`)
            or of different data.
          warn_skipped: also warn (one ``RuntimeWarning``) when steps were skipped.

        Returns:
          ``(state, records)``.
        """
        steps = self.rounds()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if round is not None:
            if round not in steps:
                raise CheckpointError(f"no checkpoint of round {round} in {self.directory}")
            candidates = [round]
        else:
            candidates = steps[::-1]
        self.skipped = []
        for step in candidates:
            try:
                with _quiet_stderr():
                    meta = _read_meta(self._get_manager(), step, self.directory)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 (an unreadable step: try the previous one)
                self.skipped.append((step, _reason(e)))
                continue
            if check_config:
                self._check(meta)
            try:
                with _quiet_stderr(grace_s=1.0):
                    out = self._restore_step(step, meta, like)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001
                self.skipped.append((step, _reason(e)))
                continue
            if self.skipped and warn_skipped:
                warnings.warn(_skipped_text(self.skipped), RuntimeWarning, stacklevel=2)
            self._last_saved = step
            return out
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} ({_skipped_text(self.skipped)})"
        )

    def _check(self, meta: dict) -> None:
        for w in check_resumable(meta["config"], self.cfg, meta["round"]):
            warnings.warn(w, RuntimeWarning)
        mine, theirs = self._dataset_fingerprint(), meta.get("dataset", {}).get("fingerprint")
        if mine and theirs and mine != theirs:
            raise CheckpointError(
                f"the dataset differs from the checkpoint's (data.name={self.cfg.data.name!r}, "
                "data.data_dir / data.source point to other files): its arrays have another "
                "fingerprint"
            )

    def _restore_step(self, step: int, meta: dict, like: Any) -> tuple[Any, list[dict]]:
        expected, _, treedef = _describe(like)
        _match_leaves(meta["leaves"], expected, f"checkpoint round {step}'s state")
        flat_like = jax.tree.leaves(like)
        abstract = {_leaf_name(i): _abstract(flat_like[i], m) for i, m in enumerate(meta["leaves"])}
        got = _restore_items(self._get_manager(), step, abstract, ("state", "records"))
        values = [
            _rebuild(got.state[_leaf_name(i)], flat_like[i], m)
            for i, m in enumerate(meta["leaves"])
        ]
        records = list(got.records)
        if len(records) != step:
            raise CheckpointError(f"checkpoint round {step} holds {len(records)} records")
        return jax.tree.unflatten(treedef, values), records


def _skipped_text(skipped: Sequence[tuple[int, str]]) -> str:
    return "skipped unreadable checkpoints: " + "; ".join(f"round {r}: {w}" for r, w in skipped)


def _versions() -> dict:
    import importlib.metadata

    import orbax.checkpoint as ocp

    try:
        version = importlib.metadata.version("marsjax")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"marsjax": version, "jax": jax.__version__, "orbax": ocp.__version__}


def _read_only_steps(directory: pathlib.Path) -> tuple[Any, list[int]]:
    mgr = _manager(directory, keep=1, read_only=True)
    return mgr, list(mgr.all_steps())


def latest_round(directory: str | os.PathLike) -> int | None:
    """The latest finished checkpoint's round in a checkpoint or results folder, or None."""
    directory = find_checkpoint_dir(directory)
    if not directory.is_dir():
        return None
    mgr, steps = _read_only_steps(directory)
    mgr.close()
    return steps[-1] if steps else None


def read_meta(directory: str | os.PathLike, round: int | None = None) -> dict:
    """The metadata (round, config, fingerprints, leaves) of a checkpoint (default: the latest
    whose metadata reads; the newer ones that did not are listed under ``"skipped"`` as
    ``(round, reason)``).

    Args:
      directory: a checkpoint folder or a results folder holding ``checkpoints/``.
      round: which step.

    Raises:
      CheckpointError: no such checkpoint, no readable one, or not a marsjax one.
    """
    directory = find_checkpoint_dir(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint folder at {directory}")
    mgr, steps = _read_only_steps(directory)
    try:
        if not steps:
            raise CheckpointError(f"no checkpoint in {directory}")
        if round is not None and round not in steps:
            raise CheckpointError(f"no checkpoint of round {round} in {directory}")
        skipped = []
        for step in [round] if round is not None else steps[::-1]:
            try:
                with _quiet_stderr():
                    meta = _read_meta(mgr, step, directory)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 (unreadable: say so, or try the previous one)
                skipped.append((step, _reason(e)))
                continue
            if skipped:
                meta["skipped"] = skipped
            return meta
        raise CheckpointError(
            f"no readable checkpoint metadata in {directory} ({_skipped_text(skipped)})"
        )
    finally:
        mgr.close()


# ------------------------------------------------------------------------------------------------
# Initial weights from a checkpoint


def _resolve_step(path: pathlib.Path) -> tuple[pathlib.Path, int | None]:
    """(checkpoint folder, step or None for the latest) from a run, checkpoint or step folder."""
    if (path / "meta").is_dir() and (path / "state").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    return find_checkpoint_dir(path), None


def load_variables(path: str | os.PathLike, like: Any) -> Any:
    """The global model of a checkpoint, checked against the tree ``like``.

    Args:
      path: a results folder (``out_dir``), its ``checkpoints/`` folder (the latest step is read)
        or one step folder (``checkpoints/<round>``).
      like: the expected variables (``model.init(...)``): tree, shapes and dtypes must match; the
        result is placed like ``like``'s leaves.

    Raises:
      CheckpointError: no checkpoint there, or its model does not match ``like`` (the message
        names the differing leaves).
    """
    directory, step = _resolve_step(pathlib.Path(path))
    if not directory.is_dir():
        raise CheckpointError(f"run.init_checkpoint: {path} does not exist")
    mgr, steps = _read_only_steps(directory)
    try:
        if not steps:
            raise CheckpointError(f"run.init_checkpoint: no checkpoint in {directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"run.init_checkpoint: no checkpoint of round {step}")
        meta = _read_meta(mgr, step, directory)
        prefix = ".global_variables"
        index = {
            m["path"][len(prefix) :]: (i, m)
            for i, m in enumerate(meta["leaves"])
            if m["path"].startswith(prefix)
        }
        expected, _, treedef = _describe(like)
        saved = [{**m, "path": p} for p, (_, m) in index.items()]
        _match_leaves(saved, expected, f"the model in {directory}/{step}")
        flat_like = jax.tree.leaves(like)
        abstract, order = {}, []
        for j, e in enumerate(expected):
            i, m = index[e["path"]]
            abstract[_leaf_name(i)] = _abstract(flat_like[j], m)
            order.append((i, m))
        got = _restore_items(mgr, step, abstract, ("state",)).state
    finally:
        mgr.close()
    values = [_rebuild(got[_leaf_name(i)], flat_like[j], m) for j, (i, m) in enumerate(order)]
    return jax.tree.unflatten(treedef, values)


# ------------------------------------------------------------------------------------------------
# A resumable run


def rewrite_metrics(out_dir: str | os.PathLike, records: Sequence[dict]) -> None:
    """Replaces ``out_dir/metrics.jsonl`` by ``records`` (atomically: temp file + rename)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "metrics.jsonl.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)
    os.replace(tmp, out / "metrics.jsonl")


def __getattr__(name: str):
    # ``checkpoint.run_resumable`` now lives in :mod:`marsjax.simulation` (which uses this module,
    # not the other way round); the old name still works, resolved on first use.
    if name == "run_resumable":
        from marsjax.simulation import run_resumable

        return run_resumable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
