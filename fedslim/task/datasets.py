"""Data sets by name: ``dataset=<name>`` -> a loader. Register your own in a plug-in.

A loader takes the run's :class:`~fedslim.config.DataConfig` and seed and returns
:class:`Loaded`: the labelled pool to split (clients / val / test / proxy) and, when the
files carry their own test split and ``keep-test-split`` is on, that test set (then only
clients / val / proxy are carved from the pool). Built in:

* ``digits`` -- scikit-learn's 8x8 digits, shipped with the package;
* ``synthetic`` -- class-conditional Gaussian 8x8 images, any size;
* ``synthetic32`` -- CIFAR-shaped (3x32x32) class-conditional Gaussian images (not CIFAR);
* ``digits32`` -- the digits upsampled to 3x32x32 (for CIFAR-shaped conv nets);
* ``motifs`` -- a generated 1-D sequence task (N, 1, 96): the order of two shapes is the
  class (:mod:`fedslim.task.generated`);
* ``mnist`` -- the four IDX files in ``data-dir`` (train and test pooled);
* ``cifar10`` -- the *binary* batches in ``data-dir`` (pooled);
* ``npz`` -- ``data-dir/train.npz`` (arrays ``x``, ``y``) and optionally ``test.npz``:
  float or integer features of ANY shape per example, integer labels; see :func:`load_npz`.

Nothing is downloaded and nothing is unpickled (``np.load(allow_pickle=False)``; CIFAR's
*python* pickles are deliberately not supported).

Register a data set::

    @register_dataset("my_data", needs_data_dir=True)
    def my_data(cfg: DataConfig, seed: int) -> Loaded:
        return Loaded(pool=ArrayData(x, y), test=None)
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedslim.config import DataConfig
from fedslim.errors import DataError
from fedslim.registry import Registry
from fedslim.task.arrays import ArrayData
from fedslim.task.generated import make_motifs, upsample_digits


@dataclass(frozen=True)
class Loaded:
    """What a loader returns: the pool to split and, optionally, a test set to keep."""

    pool: ArrayData
    test: ArrayData | None = None


@dataclass(frozen=True)
class DatasetEntry:
    """A registered loader and whether it reads ``data-dir`` (checked at parse time)."""

    load: Callable[[DataConfig, int], Loaded]
    needs_data_dir: bool = False

    def __call__(self, cfg: DataConfig, seed: int) -> Loaded:
        return self.load(cfg, seed)


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(name: str, needs_data_dir: bool = False
                     ) -> Callable[[Callable[[DataConfig, int], Loaded]],
                                   Callable[[DataConfig, int], Loaded]]:
    """Decorator registering a loader under ``name`` (a duplicate name is an error)."""

    def deco(fn: Callable[[DataConfig, int], Loaded]) -> Callable[[DataConfig, int], Loaded]:
        DATASETS.register(name)(DatasetEntry(fn, needs_data_dir))
        return fn

    return deco


def load_digits_pool() -> ArrayData:
    """scikit-learn's 8x8 digits (1797 images), scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return ArrayData(np.ascontiguousarray(x), bunch.target.astype(np.int64))


def make_synthetic(num_samples: int, num_classes: int = 10, image_size: int = 8,
                   seed: int = 0, channels: int = 1, noise: float = 1.5) -> ArrayData:
    """Class-conditional Gaussian images: learnable, any size, for scale tests."""
    rng = np.random.default_rng(seed)
    shape = (channels, image_size, image_size)
    prototypes = rng.normal(0.0, 1.0, (num_classes, *shape))
    y = rng.integers(0, num_classes, num_samples)
    x = np.empty((num_samples, *shape), dtype=np.float32)
    chunk = 4096  # the float64 draws in pieces (the same stream, so the same values)
    for i in range(0, num_samples, chunk):
        n = min(chunk, num_samples - i)
        x[i:i + n] = prototypes[y[i:i + n]] + rng.normal(0.0, noise, (n, *shape))
    return ArrayData(x, y.astype(np.int64))


def _open_maybe_gz(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if path.suffix == ".gz" else raw


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST format): magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    raw = _open_maybe_gz(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: bad IDX dimension count {ndim}")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    expected = int(np.prod(dims, dtype=np.int64))
    body = raw[4 + 4 * ndim:]
    if len(body) != expected:
        raise DataError(f"{path}: header says {dims} ({expected} bytes), file has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).exists():
            return directory / name
    raise DataError(f"{directory}: missing {stem}[.gz]")


def load_mnist_pool(directory: str | Path) -> ArrayData:
    """MNIST from the four standard IDX files (optionally .gz); train and test pooled."""
    d = Path(directory)
    xs, ys = [], []
    for prefix in ("train", "t10k"):
        images = read_idx(_find(d, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(d, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{d}: {prefix} images {images.shape} / labels {labels.shape} "
                            "do not match")
        xs.append(images.astype(np.float32)[:, None] / 255.0)
        ys.append(labels.astype(np.int64))
    return ArrayData(np.concatenate(xs), np.concatenate(ys))


CIFAR_RECORD = 1 + 3 * 32 * 32


def load_cifar10_pool(directory: str | Path) -> ArrayData:
    """CIFAR-10 from the *binary* batches (data_batch_*.bin, test_batch.bin), pooled."""
    d = Path(directory)
    files = sorted(d.glob("data_batch_*.bin")) + sorted(d.glob("test_batch.bin"))
    if not files:
        raise DataError(f"{d}: no CIFAR-10 binary batches (data_batch_*.bin, test_batch.bin)")
    xs, ys = [], []
    for f in files:
        raw = f.read_bytes()
        if len(raw) == 0 or len(raw) % CIFAR_RECORD:
            raise DataError(f"{f}: size {len(raw)} is not a multiple of {CIFAR_RECORD}")
        rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
        labels = rec[:, 0].astype(np.int64)
        if labels.max() > 9:
            raise DataError(f"{f}: label {labels.max()} out of range 0..9")
        ys.append(labels)
        xs.append(rec[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return ArrayData(np.concatenate(xs), np.concatenate(ys))


@register_dataset("digits")
def _digits(cfg: DataConfig, seed: int) -> Loaded:
    return Loaded(load_digits_pool())


@register_dataset("synthetic")
def _synthetic(cfg: DataConfig, seed: int) -> Loaded:
    return Loaded(make_synthetic(cfg.synthetic_samples, seed=seed))


@register_dataset("synthetic32")
def _synthetic32(cfg: DataConfig, seed: int) -> Loaded:
    """CIFAR-shaped (3x32x32, 10 classes) class-conditional Gaussian images, scaled to unit
    variance. Not CIFAR: a learnable stand-in for when the CIFAR-10 binary batches are not
    at hand. The noise (std 3 around unit-variance prototypes) keeps it from being solved
    in a round: ``wide32`` trained centrally on 2,000 of them reaches 0.16 test accuracy
    after one epoch and 0.32 after two."""
    data = make_synthetic(cfg.synthetic_samples, image_size=32, seed=seed, channels=3,
                          noise=3.0)
    return Loaded(ArrayData(data.x / np.float32(np.sqrt(10.0)), data.y))


@register_dataset("digits32")
def _digits32(cfg: DataConfig, seed: int) -> Loaded:
    """The 1,797 digits as 3x32x32 images in [-1, 1] (Flower's quickstart shape)."""
    return Loaded(upsample_digits(load_digits_pool()))


@register_dataset("motifs")
def _motifs(cfg: DataConfig, seed: int) -> Loaded:
    """``synthetic-samples`` sequences of the motif-order task (10 classes)."""
    return Loaded(make_motifs(cfg.synthetic_samples, seed=seed))


@register_dataset("mnist", needs_data_dir=True)
def _mnist(cfg: DataConfig, seed: int) -> Loaded:
    return Loaded(load_mnist_pool(cfg.data_dir))


@register_dataset("cifar10", needs_data_dir=True)
def _cifar10(cfg: DataConfig, seed: int) -> Loaded:
    return Loaded(load_cifar10_pool(cfg.data_dir))


# --------------------------------------------------------------------------- npz
def _read_npz(path: Path) -> ArrayData:
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            if not {"x", "y"} <= names:
                raise DataError(f"{path}: needs arrays 'x' and 'y', has {sorted(names)}")
            x, y = f["x"], f["y"]
    except (OSError, ValueError) as exc:  # not a zip / an object array needing pickle
        raise DataError(f"{path}: not a readable .npz of plain arrays: {exc}") from None
    if x.dtype.kind not in "fiub" or x.ndim < 2:
        raise DataError(f"{path}: 'x' must be a numeric array of shape (N, ...), got "
                        f"{x.dtype} {x.shape}")
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise DataError(f"{path}: 'y' must hold integer labels of shape (N,), got "
                        f"{y.dtype} {y.shape}")
    if len(x) != len(y) or len(y) == 0:
        raise DataError(f"{path}: x has {len(x)} rows and y {len(y)}; need the same, > 0")
    if y.min() < 0:
        raise DataError(f"{path}: labels must be >= 0, found {int(y.min())}")
    return ArrayData(np.ascontiguousarray(x.astype(np.float32)), y.astype(np.int64))


def _layout(data: ArrayData, cfg: DataConfig) -> ArrayData:
    if cfg.layout == "channels-last" and data.x.ndim >= 3:
        return ArrayData(np.ascontiguousarray(np.moveaxis(data.x, -1, 1)), data.y)
    return data


@register_dataset("npz", needs_data_dir=True)
def load_npz(cfg: DataConfig, seed: int) -> Loaded:
    """``data-dir/train.npz`` (+ optional ``test.npz``), arrays ``x`` (N, ...) and ``y`` (N,).

    Features may be float or integer and of any shape per example (vectors, sequences,
    images); they become float32 as they are (no rescaling; see ``normalize``).
    ``layout=channels-last`` moves the last axis to position 1 (e.g. (N, H, W, C) images
    or (N, T, C) sequences to channels-first). With ``keep-test-split`` (default) a
    ``test.npz`` is the server's test set, and val / proxy are carved from ``train.npz``;
    without one (or with ``keep-test-split=false``) everything is pooled and split.
    """
    d = Path(cfg.data_dir).expanduser()
    train_path, test_path = d / "train.npz", d / "test.npz"
    if not train_path.is_file():
        raise DataError(f"data-dir {str(d)!r} has no train.npz (arrays x, y)")
    train = _layout(_read_npz(train_path), cfg)
    test = _layout(_read_npz(test_path), cfg) if test_path.is_file() else None
    if test is not None and test.x.shape[1:] != train.x.shape[1:]:
        raise DataError(f"{test_path}: examples of shape {test.x.shape[1:]}, train.npz has "
                        f"{train.x.shape[1:]}")
    if test is not None and not cfg.keep_test_split:
        return Loaded(ArrayData(np.concatenate([train.x, test.x]),
                                np.concatenate([train.y, test.y])))
    return Loaded(train, test)


def load(cfg: DataConfig, seed: int) -> Loaded:
    """Run the loader registered as ``cfg.dataset``."""
    return DATASETS[cfg.dataset](cfg, seed)
