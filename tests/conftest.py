"""Shared fixtures. Tests run on the CPU; multi-device tests start their own subprocesses."""

from __future__ import annotations

import importlib.util
import os
import pathlib

# Keep XLA from grabbing both cores per test process under pytest-xdist, and keep runs quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import pytest


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
