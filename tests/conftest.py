"""Shared fixtures. Tests run on the CPU; multi-device tests start their own subprocesses."""

from __future__ import annotations

import os

# Keep XLA from grabbing both cores per test process under pytest-xdist, and keep runs quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax
import pytest


@pytest.fixture
def key():
    return jax.random.key(0)
