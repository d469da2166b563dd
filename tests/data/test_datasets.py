import gzip
import os
import pathlib

import numpy as np
import pytest

from marsjax.data import DatasetError, load_dataset, load_idx
from marsjax.data.datasets import DEBIAN_FASHION_MNIST_DIR


def test_digits_is_real_and_split_stratified():
    ds = load_dataset("digits")
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape[1:] == (8, 8, 1)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert ds.x_train.max() == 255 and ds.x_train.min() == 0
    # every class in both splits, ~20% held out
    assert set(np.unique(ds.y_test)) == set(range(10))
    assert 0.18 < len(ds.y_test) / 1797 < 0.22
    # the normalisation constants describe the data
    assert abs(ds.x_train.mean() / 255 - ds.mean[0]) < 0.01


def test_digits_read_from_the_csv_equal_sklearns_loader():
    """The CSV read that avoids importing scikit-learn gives what ``load_digits`` gives."""
    from sklearn.datasets import load_digits

    from marsjax.data.datasets import _digits_arrays

    images, target = _digits_arrays()
    ref = load_digits()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(target, ref.target)
    assert target.dtype == np.int32


def _write_idx(path, arr, gz=True, truncate=0):
    arr = np.asarray(arr, np.uint8)
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.tobytes()
    if truncate:
        raw = raw[:-truncate]
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _fake_mnist_dir(d: pathlib.Path, n=20, truncate_train=0):
    """Writes the four IDX files and returns ``(x_train, y_train, x_test, y_test)`` as written."""
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    x_tr[0] = 0
    x_tr[0, 2, 5] = 255  # one bright pixel: row 2, column 5 of the first image
    y_tr = rng.integers(0, 10, n, dtype=np.uint8)
    y_tr[:3] = [7, 0, 9]
    x_te = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    y_te = np.array([3, 1, 4, 1, 5], np.uint8)
    _write_idx(d / "train-images-idx3-ubyte.gz", x_tr, truncate=truncate_train)
    _write_idx(d / "train-labels-idx1-ubyte.gz", y_tr)
    _write_idx(d / "t10k-images-idx3-ubyte.gz", x_te, gz=False)
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", y_te)
    return x_tr, y_tr, x_te, y_te


def test_idx_roundtrip(tmp_path):
    x_tr, y_tr, x_te, y_te = _fake_mnist_dir(tmp_path)
    ds = load_dataset("mnist", data_dir=str(tmp_path), source="idx")
    assert ds.x_train.shape == (20, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int32
    # the pixels and labels the files hold, in order and orientation (row-major, row first)
    np.testing.assert_array_equal(ds.x_train[..., 0], x_tr)
    np.testing.assert_array_equal(ds.x_test[..., 0], x_te)
    np.testing.assert_array_equal(ds.y_train, y_tr)
    np.testing.assert_array_equal(ds.y_test, y_te)
    assert ds.x_train[0, 2, 5, 0] == 255 and ds.x_train[0].sum() == 255
    assert ds.y_train[:3].tolist() == [7, 0, 9] and ds.y_test.tolist() == [3, 1, 4, 1, 5]


def test_load_idx_reads_the_header_big_endian(tmp_path):
    # dims 2 x 300 x 3: 300 = 0x0000012c, which a little-endian read would take for 0x2c010000
    arr = np.arange(1800, dtype=np.int64).reshape(2, 300, 3) % 251
    _write_idx(tmp_path / "a", arr, gz=False)
    got = load_idx(tmp_path / "a")
    assert got.shape == (2, 300, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, arr)
    raw = (tmp_path / "a").read_bytes()
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 1, 0x2C, 0, 0, 0, 3])


def test_truncated_idx_names_the_file(tmp_path):
    _fake_mnist_dir(tmp_path, truncate_train=100)
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_dataset("mnist", data_dir=str(tmp_path), source="idx")


def test_corrupt_gzip_names_the_file(tmp_path):
    p = tmp_path / "x.gz"
    p.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DatasetError, match="x.gz.*corrupt"):
        load_idx(p)
    q = tmp_path / "y"
    q.write_bytes(b"\x00\x00\x0d\x01abcd")
    with pytest.raises(DatasetError, match="bad magic"):
        load_idx(q)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="not found.*To get it"):
        load_dataset("mnist", data_dir=str(tmp_path), source="idx")
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("svhn")


def test_tfds_missing_data_dir_fails_fast_offline(tmp_path):
    # download=False: must not touch the network, must say how to get the data
    with pytest.raises(DatasetError, match="not available offline.*tensorflow-datasets"):
        load_dataset("cifar10", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "name,shape,classes",
    [("mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100)],
)
def test_tfds_loader_with_mock_data(name, shape, classes):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        ds = load_dataset(name, source="tfds")
    assert ds.x_train.shape == (12, *shape) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (12, *shape)
    assert ds.num_classes == classes
    assert ds.y_train.min() >= 0 and ds.y_train.max() < classes


@pytest.mark.skipif(
    not os.path.exists(os.path.join(DEBIAN_FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_idx():
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert np.array_equal(np.bincount(ds.y_train), np.full(10, 6000))
    assert np.array_equal(np.bincount(ds.y_test), np.full(10, 1000))
    assert abs(ds.x_train.mean() / 255 - ds.mean[0]) < 0.01
