"""The client axis over devices: 8 fake CPU devices and 2 real processes give the 1-device run."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

HELPER = pathlib.Path(__file__).parent / "helpers" / "sharded_run.py"


def _run(out, *args, wait=True):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # the helper sets both
    p = subprocess.Popen(
        [sys.executable, str(HELPER), str(out), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if wait:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    return p


def _load(path):
    return json.loads(pathlib.Path(path).read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "r.json"
    _run(out, 1, "--no-mesh")
    return _load(out)


def _assert_same(a, b):
    assert a["summary"]["acc"] == pytest.approx(b["summary"]["acc"], abs=1e-3)
    assert a["summary"]["asr"] == pytest.approx(b["summary"]["asr"], abs=1e-3)
    for ra, rb in zip(a["records"], b["records"]):
        assert ra["client_ids"] == rb["client_ids"]
        assert ra["accepted"] == rb["accepted"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
    for la, lb in zip(a["leaves"], b["leaves"]):
        np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-6)


def test_eight_fake_devices_match_one(single, tmp_path):
    out = tmp_path / "r.json"
    _run(out, 8)
    got = _load(out)
    assert got["devices"] == 8 and got["mesh"] == 8
    _assert_same(got, single)


def test_two_processes_match_one(single, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [_run(tmp_path / f"p{i}.json", 2, i, 2, port, wait=False) for i in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    for i in range(2):
        got = _load(tmp_path / f"p{i}.json")
        assert got["processes"] == 2 and got["devices"] == 4 and got["mesh"] == 4
        _assert_same(got, single)
