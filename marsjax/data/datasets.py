"""Datasets as uint8 arrays, loaded once on the host.

No dataset is downloaded at run time. Sources:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, real data that ships in
  a dependency): the offline default.
* ``mnist`` / ``fashion_mnist``: the IDX files (``train-images-idx3-ubyte.gz`` ...) from
  ``data_dir`` or from where Debian's ``dataset-fashion-mnist`` package puts them; otherwise tfds.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: ``tfds.data_source`` (array_record, no
  TensorFlow needed) from a prepared ``data_dir``, never downloading.
"""

from __future__ import annotations

import gzip
import os
import pathlib
from typing import NamedTuple

import numpy as np

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "Dataset",
    "DatasetError",
    "load_dataset",
    "load_idx",
]

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# name -> (num_classes, image shape, channel mean, channel std) of the [0, 1]-scaled pixels.
_META = {
    "digits": (10, (8, 8, 1), (0.3053,), (0.3759,)),
    "mnist": (10, (28, 28, 1), (0.1307,), (0.3081,)),
    "fashion_mnist": (10, (28, 28, 1), (0.2860,), (0.3530,)),
    "cifar10": (10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": (100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DATASETS = tuple(_META)

_HOW_TO_GET = {
    "mnist": (
        "put the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in --data-dir, or prepare it with "
        "tensorflow-datasets on a machine with a network: "
        "`python -c \"import tensorflow_datasets as tfds; tfds.data_source('mnist', data_dir=DIR, "
        "builder_kwargs={'file_format': 'array_record'})\"`"
        " and pass --data-dir DIR"
    ),
    "fashion_mnist": (
        "on Debian/Ubuntu `apt-get install dataset-fashion-mnist` (installs the IDX files in "
        f"{DEBIAN_FASHION_MNIST_DIR}), or put the four IDX files in --data-dir, or prepare it with "
        "tensorflow-datasets on a machine with a network and pass --data-dir"
    ),
    "cifar10": (
        "prepare it with tensorflow-datasets on a machine with a network: "
        "`python -c \"import tensorflow_datasets as tfds; tfds.data_source('cifar10', "
        "data_dir=DIR, builder_kwargs={'file_format': 'array_record'})\"` and pass --data-dir DIR"
    ),
    "cifar100": (
        "prepare it with tensorflow-datasets on a machine with a network: "
        "`python -c \"import tensorflow_datasets as tfds; tfds.data_source('cifar100', "
        "data_dir=DIR, builder_kwargs={'file_format': 'array_record'})\"` and pass --data-dir DIR"
    ),
}


class DatasetError(RuntimeError):
    """A dataset is missing or unreadable; the message says which file and how to get it."""


class Dataset(NamedTuple):
    """A classification dataset held as uint8 images (host numpy arrays).

    Attributes:
      name: registry name.
      x_train: ``[n_train, H, W, C]`` uint8.
      y_train: ``[n_train]`` int32.
      x_test: ``[n_test, H, W, C]`` uint8.
      y_test: ``[n_test]`` int32.
      num_classes: number of labels.
      mean: per-channel mean of the [0, 1]-scaled pixels (normalisation happens on the device).
      std: per-channel standard deviation.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])


def _finish(name, x_tr, y_tr, x_te, y_te) -> Dataset:
    num_classes, shape, mean, std = _META[name]
    x_tr = np.ascontiguousarray(x_tr, np.uint8).reshape((-1, *shape))
    x_te = np.ascontiguousarray(x_te, np.uint8).reshape((-1, *shape))
    return Dataset(
        name,
        x_tr,
        np.asarray(y_tr, np.int32),
        x_te,
        np.asarray(y_te, np.int32),
        num_classes,
        mean,
        std,
    )


def _load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are 0..16 (counts of set pixels in 4x4 blocks of the original 32x32 bitmaps).
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int32)
    # A fixed stratified split, independent of the experiment seed, so every run tests on the same
    # images.
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, round(test_fraction * len(idx)), replace=False)] = True
    return _finish("digits", x[~test], y[~test], x[test], y[test])


def load_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (``.gz`` or raw) into a numpy array, checking its header.

    Raises:
      DatasetError: naming the file, if it is missing, truncated or not an IDX file.
    """
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, EOFError) as e:
        raise DatasetError(
            f"{path}: cannot read or decompress ({e}); the file is corrupt"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path}: truncated or padded: header says {dims} = {expected} bytes of data, "
            f"the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _find_idx_dir(name: str, data_dir: str | None) -> pathlib.Path | None:
    candidates = []
    if data_dir:
        d = pathlib.Path(data_dir)
        candidates += [d, d / name, d / name.replace("_", "-")]
    if name == "fashion_mnist":
        candidates.append(pathlib.Path(DEBIAN_FASHION_MNIST_DIR))
    for c in candidates:
        if all((c / f).exists() or (c / (f + ".gz")).exists() for f in _IDX_FILES):
            return c
    return None


def _load_idx_dataset(name: str, directory: pathlib.Path) -> Dataset:
    arrays = []
    for f in _IDX_FILES:
        p = directory / (f + ".gz")
        arrays.append(load_idx(p if p.exists() else directory / f))
    x_tr, y_tr, x_te, y_te = arrays
    for xs, ys, split in ((x_tr, y_tr, "train"), (x_te, y_te, "t10k")):
        if len(xs) != len(ys):
            raise DatasetError(
                f"{directory}: {split} images ({len(xs)}) and labels ({len(ys)}) differ in count"
            )
        if xs.shape[1:] != (28, 28):
            raise DatasetError(f"{directory}: {split} images are {xs.shape[1:]}, expected 28x28")
    return _finish(name, x_tr, y_tr, x_te, y_te)


def _load_tfds(name: str, data_dir: str | None) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DatasetError(f"{name}: tensorflow-datasets is not importable ({e})") from None
    try:
        sources = tfds.data_source(name, split=["train", "test"], data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - tfds raises several types for "not prepared"
        raise DatasetError(
            f"dataset {name!r} is not available offline (data_dir={data_dir!r}: "
            f"{type(e).__name__}: {' '.join(str(e).split())[:200]}). "
            f"To get it: {_HOW_TO_GET[name]}"
        ) from None
    out = []
    for src in sources:
        n = len(src)
        try:
            items = src.__getitems__(list(range(n)))
        except (AttributeError, TypeError):  # older sources and tfds's mock lack batch reads
            items = [src[i] for i in range(n)]
        out.append(np.stack([np.asarray(it["image"]) for it in items]))
        out.append(np.asarray([int(it["label"]) for it in items]))
    return _finish(name, *out)


def load_dataset(name: str, data_dir: str | None = None, source: str = "auto") -> Dataset:
    """Loads a dataset by name, offline.

    Args:
      name: one of :data:`DATASETS`.
      data_dir: where IDX files or a prepared tfds ``data_dir`` live.
      source: ``"auto"`` (bundled, then IDX, then tfds), ``"idx"`` or ``"tfds"``.

    Raises:
      DatasetError: the dataset is missing or corrupt; the message says how to get it.
    """
    if name not in _META:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if name == "digits":
        return _load_digits()
    if source in ("auto", "idx") and name in ("mnist", "fashion_mnist"):
        d = _find_idx_dir(name, data_dir)
        if d is not None:
            return _load_idx_dataset(name, d)
        if source == "idx":
            raise DatasetError(
                f"IDX files for {name!r} not found (looked in data_dir={data_dir!r}"
                + (f" and {DEBIAN_FASHION_MNIST_DIR}" if name == "fashion_mnist" else "")
                + f"). To get it: {_HOW_TO_GET[name]}"
            )
    if source not in ("auto", "idx", "tfds"):
        raise DatasetError(f"source must be 'auto', 'idx' or 'tfds', got {source!r}")
    return _load_tfds(name, data_dir)
