"""Checkpoint and resume: a killed run resumes to exactly the uninterrupted run; bad input refused."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from marsjax import checkpoint, cli, simulation
from marsjax.checkpoint import Checkpointer, CheckpointError
from marsjax.config import from_dict, get_preset, override
from marsjax.data import load_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _leaves(tree) -> list[np.ndarray]:
    out = []
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append(np.array(x))
    return out


def _assert_trees_equal(a, b) -> None:
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape
        if x.tobytes() != y.tobytes():  # bit for bit (NaN payloads included)
            np.testing.assert_array_equal(x, y)
            raise AssertionError(f"same values, other bits: {x!r} vs {y!r}")


def _strip(records) -> list[list]:
    """The records without the wall-clock time, as (key, value) lists: key order counts too."""
    return [[(k, v) for k, v in r.items() if k != "elapsed_s"] for r in records]


def _jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# Acceptance: SIGKILL between checkpoints and during a save, resume, same metrics and model.

# Runs `marsjax` and stops at a chosen point (writing a marker file) so that the test can SIGKILL
# it exactly there: during the save of a step (after its files are written, before orbax's
# finalizing rename), or after a host step between two checkpoints.
_DRIVER = r"""
import os, pathlib, sys, time
marker = pathlib.Path(os.environ["MARKER"])
hang_save = os.environ.get("HANG_SAVE")
hang_after = os.environ.get("HANG_AFTER")
from orbax.checkpoint._src.path import atomicity
from marsjax import checkpoint, cli

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def hanging_finalize(self, *args, **kwargs):
    if self.get_final().name == hang_save:
        marker.write_text("saving")
        time.sleep(600)
    return await finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = hanging_finalize
call = checkpoint.Checkpointer.__call__

def hanging_call(self, state, records):
    call(self, state, records)
    if hang_after is not None and int(state.round) == int(hang_after):
        marker.write_text("between")
        time.sleep(600)

checkpoint.Checkpointer.__call__ = hanging_call
sys.exit(cli.main(sys.argv[1:]))
"""

_SETS = ["--set", "run.rounds=6", "--set", "run.eval_every=2", "--set", "run.rounds_per_call=1"]


def _start(tmp_path, args, name, **hang) -> tuple[subprocess.Popen, pathlib.Path]:
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    marker = tmp_path / f"{name}.marker"
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "MARKER": str(marker),
        # compiled once by the first process, loaded from disk by the others (saves ~5 s each)
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        **{k: str(v) for k, v in hang.items()},
    }
    with open(tmp_path / f"{name}.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [sys.executable, str(driver), *args], cwd=tmp_path, env=env, stdout=log, stderr=log
        )
    return proc, marker


def _kill_at_marker(proc, marker, tmp_path, name, timeout=240.0) -> str:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"{name} ended ({proc.returncode}) before the kill point:\n" + _log(tmp_path, name)
            )
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{name} never reached the kill point:\n" + _log(tmp_path, name))
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return marker.read_text()


def _log(tmp_path, name) -> str:
    return (tmp_path / f"{name}.log").read_text()[-4000:]


def _finish(proc, tmp_path, name, timeout=240.0) -> None:
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, _log(tmp_path, name)


@pytest.mark.slow
def test_sigkill_during_save_and_between_checkpoints_then_resume_is_exact(tmp_path):
    run_args = ["run", "demo", *_SETS, "--checkpoint-every", "2", "--quiet"]
    # 1. Killed while saving round 4 (its files written, not yet renamed into place).
    first, marker = _start(tmp_path, [*run_args, "--out", "run"], "first", HANG_SAVE=4)
    assert _kill_at_marker(first, marker, tmp_path, "first") == "saving"
    ckpts = tmp_path / "run" / "checkpoints"
    assert any(".orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir()), list(ckpts.iterdir())
    assert checkpoint.latest_round(tmp_path / "run") == 2  # the interrupted save is invisible
    assert len(_jsonl(tmp_path / "run" / "metrics.jsonl")) == 4
    # The reference: uninterrupted (in parallel with the next attempt).
    base, _ = _start(tmp_path, [*run_args, "--out", "base"], "base")
    # 2. Resumed from the checkpoint's own config, killed between checkpoints (after round 5).
    second, marker = _start(tmp_path, ["run", "--resume", "run", "--quiet"], "second", HANG_AFTER=5)
    assert _kill_at_marker(second, marker, tmp_path, "second") == "between"
    assert "from its checkpoint of round 2" in _log(tmp_path, "second")
    assert checkpoint.latest_round(tmp_path / "run") == 4
    assert not any(".orbax-checkpoint-tmp" in p.name for p in ckpts.iterdir())
    assert len(_jsonl(tmp_path / "run" / "metrics.jsonl")) == 5
    # 3. Resumed with the config given again, to the end.
    third, _ = _start(tmp_path, [*run_args[:-1], "--resume", "run", "--quiet"], "third")
    _finish(third, tmp_path, "third")
    _finish(base, tmp_path, "base")
    assert "from its checkpoint of round 4" in _log(tmp_path, "third")

    got, want = (
        _jsonl(tmp_path / "run" / "metrics.jsonl"),
        _jsonl(tmp_path / "base" / "metrics.jsonl"),
    )
    assert [r["round"] for r in got] == list(range(6))
    assert _strip(got) == _strip(want)
    summary = lambda d: {
        k: v
        for k, v in json.loads((tmp_path / d / "summary.json").read_text()).items()
        if k not in ("wall_s", "provenance")  # provenance: the command and time differ
    }
    assert summary("run") == summary("base")
    # The whole final state (model, optimizer, defense and attack states, key), bit for bit.
    meta = checkpoint.read_meta(tmp_path / "run")
    assert meta["round"] == 6
    cfg = from_dict(meta["config"])
    sim = simulation.build(cfg)
    like = sim.init_state()
    s_run, r_run = Checkpointer(ckpts, cfg).restore(like, check_config=False)
    s_base, r_base = Checkpointer(tmp_path / "base" / "checkpoints", cfg).restore(
        like, check_config=False
    )
    _assert_trees_equal(s_run, s_base)
    assert _strip(r_run) == _strip(r_base) == _strip(want)


# ------------------------------------------------------------------------------------------------
# In-process: one compiled simulation, checkpoints of every round, restored and continued.


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _cfg(out_dir, **changes):
    base = {
        "run.rounds": 4,
        "run.eval_every": 2,
        "run.checkpoint_every": 1,
        "run.out_dir": str(out_dir),
    }
    return override(get_preset("demo", defense="fedavg"), {**base, **changes})


@pytest.fixture(scope="module")
def finished(tmp_path_factory, digits):
    """A 4-round run saving every round (all kept), with the state of every round (as the run
    held it in memory, before any checkpoint is read back) copied to the host."""
    out = tmp_path_factory.mktemp("finished")
    cfg = _cfg(out)
    states, models = {}, {}

    def keep_state(state, records):
        states[int(state.round)] = _leaves(state)
        models[int(state.round)] = _leaves(state.global_variables)

    res = checkpoint.run_resumable(
        cfg, dataset=digits, progress=False, keep=10, callback=keep_state
    )
    assert sorted(states) == [1, 2, 3, 4]
    return {
        "cfg": cfg,
        "out": out,
        "sim": res["sim"],
        "final": _leaves(res["state"]),
        "states": states,
        "models": models,
        "records": res["records"],
        "lines": _jsonl(out / "metrics.jsonl"),
    }


def _assert_leaves_bitwise(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for x, y in zip(got, want):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), (x, y)


def test_every_round_saved_and_resume_from_each_is_bitwise(finished, tmp_path):
    cfg, sim = finished["cfg"], finished["sim"]
    ckpt = Checkpointer(finished["out"] / "checkpoints", cfg, dataset=sim.dataset)
    assert ckpt.rounds() == [1, 2, 3, 4]
    assert not (finished["out"] / "checkpoints" / "_trash").exists() or not any(
        (finished["out"] / "checkpoints" / "_trash").iterdir()
    )
    for start in (1, 3):
        state, records = ckpt.restore(sim.init_state(), round=start)
        assert int(state.round) == start and len(records) == start
        _assert_leaves_bitwise(_leaves(state), finished["states"][start])
        assert _strip(records) == _strip(finished["records"][:start])
        res = simulation.run(
            override(cfg, {"run.out_dir": None, "run.checkpoint_every": 0}),
            sim=sim,
            state=state,
            records=records,
            progress=False,
        )
        for a, b in zip(_leaves(res["state"]), finished["final"]):
            np.testing.assert_array_equal(a, b)
        assert _strip(res["records"]) == _strip(finished["records"])
    # the latest checkpoint holds the final state, and metrics.jsonl the same records
    state, records = ckpt.restore(sim.init_state())
    for a, b in zip(_leaves(state), finished["final"]):
        np.testing.assert_array_equal(a, b)
    assert records == finished["lines"]


def test_resume_truncates_metrics_and_extends_rounds(finished, tmp_path, digits):
    """A copy of the run resumed from round 2 with run.rounds raised to 5: metrics.jsonl is cut
    back to the checkpoint, then continues exactly like the original."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished["out"], out)
    for step in (3, 4):
        shutil.rmtree(out / "checkpoints" / str(step))
    cfg = _cfg(out, **{"run.rounds": 5, "run.eval_every": 1})  # bookkeeping fields may change
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + "half a li")
    res = checkpoint.run_resumable(
        cfg, resume=True, dataset=digits, progress=False, sim=finished["sim"]
    )
    assert res["resumed_from"] == 2
    lines = _jsonl(out / "metrics.jsonl")
    assert [r["round"] for r in lines] == [0, 1, 2, 3, 4]
    assert _strip(lines[:2]) == _strip(finished["lines"][:2])
    # rounds 2, 3 are the original's (evaluated now in round 3 too: run.eval_every=1)
    for got, want in zip(lines[2:4], finished["lines"][2:4]):
        assert _strip([{k: v for k, v in got.items() if k in want}]) == _strip([want])
    assert "acc" in lines[2] and "acc" in lines[4]
    assert checkpoint.latest_round(out) == 5
    # execution fields may differ too, with a warning (float tolerance, not bit for bit)
    saved = checkpoint.read_meta(out)["config"]
    warns = checkpoint.check_resumable(saved, override(cfg, {"run.client_chunk": 5}), 5)
    assert len(warns) == 1 and "run.client_chunk" in warns[0]


def test_other_experiment_is_refused_naming_the_fields(finished):
    cfg, sim = finished["cfg"], finished["sim"]
    other = override(cfg, {"train.lr": 0.1, "attack.options.scale": 2.0, "run.seed": 3})
    with pytest.raises(CheckpointError) as e:
        Checkpointer(finished["out"] / "checkpoints", other).restore(sim.init_state())
    msg = str(e.value)
    for field in ("train.lr", "attack.options.scale", "run.seed"):
        assert field in msg
    assert "0.05" in msg and "0.1" in msg  # both values
    assert "run.rounds" not in msg
    # an option only one side has is named too
    with pytest.raises(CheckpointError, match="defense.options.bogus"):
        checkpoint.check_resumable(
            checkpoint.read_meta(finished["out"])["config"],
            override(cfg, {"defense.options.bogus": 1}),
            4,
        )
    # run.rounds may grow, not shrink below the checkpoint
    with pytest.raises(CheckpointError, match="run.rounds=3"):
        checkpoint.check_resumable(
            checkpoint.read_meta(finished["out"])["config"], override(cfg, {"run.rounds": 3}), 4
        )
    # the same fields under another name and folder are fine, the fingerprint says so
    same = override(cfg, {"name": "x", "run.out_dir": "/elsewhere", "run.eval_every": 3})
    assert checkpoint.fingerprint(same) == checkpoint.fingerprint(cfg)
    assert checkpoint.fingerprint(other) != checkpoint.fingerprint(cfg)


def test_other_dataset_is_refused(finished, digits):
    cfg, sim = finished["cfg"], finished["sim"]
    y = digits.y_train.copy()
    y[0] = (y[0] + 1) % 10
    changed = digits._replace(y_train=y)
    with pytest.raises(CheckpointError, match="dataset differs"):
        Checkpointer(finished["out"] / "checkpoints", cfg, dataset=changed).restore(
            sim.init_state()
        )


def test_state_of_another_structure_is_refused(finished):
    cfg, sim = finished["cfg"], finished["sim"]
    like = sim.init_state()
    params = dict(like.global_variables["params"])
    params["extra"] = {"kernel": np.zeros((2, 2), np.float32)}
    fc2 = dict(params["fc2"])
    fc2["bias"] = np.zeros((11,), np.float32)
    params["fc2"] = fc2
    bad = like._replace(global_variables={**like.global_variables, "params": params})
    with pytest.raises(CheckpointError) as e:
        Checkpointer(finished["out"] / "checkpoints", cfg).restore(bad, check_config=False)
    msg = str(e.value)
    assert "['extra']['kernel']" in msg and "not expected" not in msg.split("missing")[0]
    assert "['fc2']['bias']: checkpoint float32[10], expected float32[11]" in msg


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, on EIO
def test_unreadable_latest_falls_back_to_the_previous(finished, tmp_path):
    import shutil

    out = tmp_path / "broken"
    shutil.copytree(finished["out"], out)
    state_dir = out / "checkpoints" / "4" / "state"
    for p in state_dir.rglob("*"):
        if p.is_file() and p.stat().st_size > 0 and "ocdbt" in str(p):
            p.write_bytes(b"\0" * 7)  # corrupt the array data
    cfg, sim = finished["cfg"], finished["sim"]
    with pytest.warns(RuntimeWarning, match="round 4"):
        state, records = Checkpointer(out / "checkpoints", cfg).restore(sim.init_state())
    assert int(state.round) == 3 and len(records) == 3
    # the whole state of round 3 (model, optimizer, defense and attack states, key), bit for bit
    _assert_leaves_bitwise(_leaves(state), finished["states"][3])
    assert _strip(records) == _strip(finished["records"][:3])


def test_fresh_run_never_mixes_with_old_checkpoints(finished, digits):
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        checkpoint.run_resumable(finished["cfg"], dataset=digits, progress=False)


def test_load_variables_for_init_checkpoint(finished, tmp_path, digits):
    sim = finished["sim"]
    like = sim.init_state().global_variables
    for path in (finished["out"], finished["out"] / "checkpoints"):
        got = checkpoint.load_variables(path, like=like)
        jax.tree.map(lambda a, b: None, got, like)  # same tree
        _assert_leaves_bitwise(_leaves(got), finished["models"][4])  # the latest: round 4
        final = checkpoint.Checkpointer(finished["out"] / "checkpoints", finished["cfg"])
        state, _ = final.restore(sim.init_state())
        _assert_trees_equal(got, state.global_variables)
    # one step folder
    got = checkpoint.load_variables(finished["out"] / "checkpoints" / "2", like=like)
    _assert_leaves_bitwise(_leaves(got), finished["models"][2])
    state, _ = Checkpointer(finished["out"] / "checkpoints", finished["cfg"]).restore(
        sim.init_state(), round=2
    )
    _assert_trees_equal(got, state.global_variables)
    # a model of another shape is refused, naming the leaves
    wide = simulation.build(
        override(
            finished["cfg"],
            {"model.batch_norm": False, "run.out_dir": None, "run.checkpoint_every": 0},
        ),
        digits,
    )
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint|not expected"):
        checkpoint.load_variables(finished["out"], like=wide.init_state().global_variables)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_variables(tmp_path / "nothing", like=like)
    # simulation.build with run.init_checkpoint starts from that model
    cfg = override(
        finished["cfg"],
        {
            "run.init_checkpoint": str(finished["out"]),
            "run.out_dir": None,
            "run.checkpoint_every": 0,
            "attack.name": "none",
            "attack.options": {},
        },
    )
    start = simulation.build(cfg, digits).init_state()
    _assert_trees_equal(start.global_variables, checkpoint.load_variables(finished["out"], like))
    assert int(start.round) == 0


def test_cli_resume_and_validate_errors(finished, tmp_path, capsys):
    assert cli.main(["run", "--resume", str(tmp_path / "empty"), "--quiet"]) == 2
    assert "checkpoint" in capsys.readouterr().err
    (tmp_path / "empty2").mkdir()
    assert cli.main(["run", "demo", "--resume", str(tmp_path / "empty2"), "--quiet"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert cli.main(["run", "demo", "--checkpoint-every", "2", "--quiet"]) == 2
    assert "run.out_dir" in capsys.readouterr().err
    assert cli.main(["run", "--quiet"]) == 2
    # validate --resume names the fields that would be refused, without running anything
    out = str(finished["out"])
    args = ["validate", "demo", "--set", "run.rounds=4", "--set", "run.eval_every=2"]
    assert cli.main([*args, "--set", "run.checkpoint_every=1", "--resume", out]) == 0
    assert "resumes" in capsys.readouterr().err
    assert cli.main([*args, "--set", "train.lr=0.2", "--resume", out]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "checkpoint error" in err
    assert cli.main([*args, "--set", "run.init_checkpoint=/no/such/dir"]) == 2
    assert "run.init_checkpoint" in capsys.readouterr().err
    # a finished run resumed again just reports (nothing to run, nothing changes)
    before = (finished["out"] / "metrics.jsonl").read_text()
    assert cli.main(["run", "--resume", out, "--quiet"]) == 0
    assert "from its checkpoint of round 4" in capsys.readouterr().err
    assert (finished["out"] / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_long_checkpointed_run_keeps_memory_flat(finished, tmp_path, digits):
    """A short soak (benchmarks/soak_memory.py runs 300+ rounds): resumed and run for 60 rounds
    with a checkpoint every 4, the live JAX arrays stay exactly constant, nothing retraces, and
    the process grows by less than a few MB."""
    import shutil

    import psutil

    out = tmp_path / "soak"
    shutil.copytree(finished["out"], out)
    cfg = _cfg(out, **{"run.rounds": 64, "run.checkpoint_every": 4, "run.eval_every": 8})
    proc = psutil.Process()
    live, rss = [], []

    def sample(state, records):
        live.append(len(jax.live_arrays()))
        rss.append(proc.memory_info().rss / 2**20)

    traces = dict(finished["sim"].traces)
    res = checkpoint.run_resumable(
        cfg, resume=True, dataset=digits, progress=False, sim=finished["sim"], callback=sample
    )
    assert res["resumed_from"] == 4 and len(live) == 60
    assert finished["sim"].traces == traces  # resuming reuses the compiled round
    # no array is left behind round after round: the count repeats with the period of the
    # checkpoints and evaluations (a save's arrays are still alive right after it)
    assert all(live[k] == live[k + 8] for k in range(8, len(live) - 8)), live
    assert rss[-1] - rss[8] < 40, rss  # MB; the records list grows by design (~3 KB a round)
    assert checkpoint.latest_round(out) == 64


def test_states_of_any_leaf_kind_roundtrip(tmp_path):
    """Defense and attack states may hold Python scalars, numpy arrays, typed keys of another
    implementation, empty nodes: each comes back as what it was, bit for bit."""
    from typing import NamedTuple

    import jax.numpy as jnp

    class State(NamedTuple):
        round: object
        count: int
        scale: float
        flag: bool
        history: np.ndarray
        keys: object
        empty: tuple
        nested: dict

    cfg = get_preset("demo")
    state = State(
        jnp.int32(2),
        7,
        0.25,
        True,
        np.arange(6, dtype=np.float64).reshape(2, 3),
        jax.random.split(jax.random.key(3, impl="rbg"), 4),
        (),
        {"a": jnp.full((3,), jnp.nan, jnp.bfloat16), "b": jnp.array([1, 2], jnp.uint8)},
    )
    with Checkpointer(tmp_path, cfg) as ckpt:
        ckpt.save(state, [{"round": 0}, {"round": 1}])
        got, records = ckpt.restore(state, check_config=False)
    assert records == [{"round": 0}, {"round": 1}]
    assert type(got.count) is int and got.count == 7
    assert type(got.scale) is float and got.scale == 0.25 and got.flag is True
    assert isinstance(got.history, np.ndarray) and got.history.dtype == np.float64
    assert str(jax.random.key_impl(got.keys)) == str(jax.random.key_impl(state.keys))
    assert got.empty == () and got.nested["a"].dtype == jnp.bfloat16
    _assert_trees_equal(got, state)
    with pytest.raises(CheckpointError, match=r"\.keys: checkpoint"):
        Checkpointer(tmp_path, cfg).restore(
            state._replace(keys=jax.random.split(jax.random.key(3), 4)), check_config=False
        )
