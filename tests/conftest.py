"""Shared fixtures. Tests run on the CPU; multi-device tests start their own subprocesses."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import tempfile

# Keep XLA from grabbing both cores per test process under pytest-xdist, and keep runs quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests check values, not speed, and most of their time is XLA compiling small programs: skip
# LLVM's optimisation passes in the CPU backend (XLA's own graph passes, fusion included, still
# run). Measured on 2 cores: compiling the all-defenses round of test_hostile 26 s instead of
# 62 s. Subprocess tests inherit it; the ones that set XLA_FLAGS themselves keep what they set.
# Measured and not used: XLA:CPU's older fusion code generator (--xla_cpu_use_fusion_emitters=
# false) halves that compile (32-35 s instead of 64 s, 2 cores shared with a sweep) and the suite
# took 1750 s instead of 2453 s, but it rounds differently from one program structure to another:
# 9 tests that compare two programs (vmapped vs looped clients, scanned vs single rounds, 8 devices
# vs 1) failed with it. The tests check the programs users run, with the default code generator.
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()

# One persistent compilation cache for the whole run, shared by the xdist workers and every
# subprocess the tests start (they inherit the environment): many tests build the same small
# programs (the quickstart round, the demo presets), and a program compiled once is loaded from
# disk afterwards. The cache key is the program and its compile options, so a code change can
# never be served a stale executable. The process that made the folder removes it at the end.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="marsjax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax
import pytest

# in case a plugin imported jax before the variables were set
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def experiment_script():
    """``load(name)``: ``experiments/<name>.py`` imported as a module (the scripts are no package)."""

    def load(name: str):
        path = pathlib.Path(__file__).resolve().parent.parent / "experiments" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
