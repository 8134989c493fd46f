"""Data sets, the server/client split, and client partitioning.

The pool of labelled examples is split once, deterministically by seed, into:

* ``test``  - server-held, labelled; only *reported*, never used to choose anything;
* ``val``   - server-held, labelled; for early stopping / model selection;
* ``proxy`` - server-held, *unlabelled* (labels are dropped here, not just ignored):
  the inputs distillation trains the student on;
* ``clients`` - everything else, partitioned across clients with flwr-datasets
  partitioners (IID, Dirichlet label skew, pathological k-classes-per-client).

No data set is downloaded: ``digits`` ships with scikit-learn, ``synthetic`` is generated,
and MNIST / CIFAR-10 are read from local files (IDX, CIFAR binary batches). Nothing is
unpickled (CIFAR's *python* pickles are deliberately not supported).
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedslim.config import DataConfig, Dataset, Partitioning
from fedslim.errors import DataError


@dataclass(frozen=True)
class ArrayData:
    """Inputs ``x`` (N, C, H, W) float32 and integer labels ``y`` (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> ArrayData:
        return ArrayData(self.x[idx], self.y[idx])

    def tensors(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.x).to(device),
                torch.from_numpy(self.y.astype(np.int64)).to(device))


@dataclass(frozen=True)
class Splits:
    """The server's held-out sets plus the pool that clients partition."""

    clients: ArrayData
    val: ArrayData
    test: ArrayData
    proxy_x: np.ndarray  # unlabelled on purpose
    num_classes: int
    input_shape: tuple[int, int, int]


# --------------------------------------------------------------------------- loaders
def load_digits_pool() -> ArrayData:
    """scikit-learn's 8x8 digits (1797 images), scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    return ArrayData(np.ascontiguousarray(x), bunch.target.astype(np.int64))


def make_synthetic(num_samples: int, num_classes: int = 10, image_size: int = 8,
                   seed: int = 0) -> ArrayData:
    """Class-conditional Gaussian images: learnable, any size, for scale tests."""
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(0.0, 1.0, (num_classes, 1, image_size, image_size))
    y = rng.integers(0, num_classes, num_samples)
    x = prototypes[y] + rng.normal(0.0, 1.5, (num_samples, 1, image_size, image_size))
    return ArrayData(x.astype(np.float32), y.astype(np.int64))


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


def load_pool(cfg: DataConfig, seed: int) -> ArrayData:
    if cfg.dataset is Dataset.DIGITS:
        return load_digits_pool()
    if cfg.dataset is Dataset.SYNTHETIC:
        return make_synthetic(cfg.synthetic_samples, seed=seed)
    if cfg.dataset is Dataset.MNIST:
        return load_mnist_pool(cfg.data_dir)
    return load_cifar10_pool(cfg.data_dir)


# --------------------------------------------------------------------------- splits
def split_pool(pool: ArrayData, cfg: DataConfig, seed: int) -> Splits:
    """Deterministic split of the pool into clients / val / test / proxy (labels dropped)."""
    n = len(pool)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(cfg.test_fraction * n)))
    n_val = int(round(cfg.val_fraction * n))
    n_proxy = int(round(cfg.proxy_fraction * n))
    if n - n_test - n_val - n_proxy < 1:
        raise DataError(f"pool of {n} examples leaves nothing for clients")
    test_idx = perm[:n_test]
    val_idx = perm[n_test:n_test + n_val]
    proxy_idx = perm[n_test + n_val:n_test + n_val + n_proxy]
    client_idx = np.sort(perm[n_test + n_val + n_proxy:])
    return Splits(
        clients=pool.subset(client_idx),
        val=pool.subset(val_idx),
        test=pool.subset(test_idx),
        proxy_x=pool.x[proxy_idx],
        num_classes=int(pool.y.max()) + 1,
        input_shape=tuple(pool.x.shape[1:]),
    )


@lru_cache(maxsize=4)
def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load the configured pool and split it (cached per process: clients call it often)."""
    return split_pool(load_pool(cfg, seed), cfg, seed)


# --------------------------------------------------------------------------- partitions
def _partitioner(cfg: DataConfig, num_partitions: int, seed: int):
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    if cfg.partitioning is Partitioning.IID:
        return IidPartitioner(num_partitions=num_partitions)
    if cfg.partitioning is Partitioning.DIRICHLET:
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                    alpha=cfg.dirichlet_alpha, min_partition_size=2,
                                    self_balancing=False, shuffle=True, seed=seed)
    return PathologicalPartitioner(num_partitions=num_partitions, partition_by="label",
                                   num_classes_per_partition=cfg.classes_per_client,
                                   class_assignment_mode="first-deterministic",
                                   shuffle=True, seed=seed)


@lru_cache(maxsize=8)
def partition_indices(cfg: DataConfig, seed: int, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Indices into ``Splits.clients`` for every partition, computed by flwr-datasets.

    The partitioner runs on a local ``datasets.Dataset`` holding only the labels and the row
    index, so no images are copied through Arrow.
    """
    from datasets import Dataset as HFDataset

    if num_partitions < 1:
        raise DataError(f"num-partitions must be >= 1, got {num_partitions}")
    clients = load_splits(cfg, seed).clients
    if num_partitions > len(clients):
        raise DataError(f"{num_partitions} partitions but only {len(clients)} client examples")
    table = HFDataset.from_dict({"label": clients.y.tolist(),
                                 "row": np.arange(len(clients)).tolist()})
    part = _partitioner(cfg, num_partitions, seed)
    part.dataset = table
    out = []
    for pid in range(num_partitions):
        try:
            rows = part.load_partition(pid)["row"]
        except ValueError as exc:  # e.g. Dirichlet cannot satisfy the minimum size
            raise DataError(f"partitioning {cfg.partitioning.value} into {num_partitions} "
                            f"failed for partition {pid}: {exc}") from exc
        out.append(np.sort(np.asarray(rows, dtype=np.int64)))
    return tuple(out)


def client_data(cfg: DataConfig, seed: int, partition_id: int,
                num_partitions: int) -> tuple[ArrayData, ArrayData]:
    """(train, eval) data of one client: its partition, split by ``client-eval-fraction``."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} outside [0, {num_partitions})")
    idx = partition_indices(cfg, seed, num_partitions)[partition_id]
    rng = np.random.default_rng((seed, partition_id))
    idx = idx[rng.permutation(len(idx))]
    n_eval = int(round(cfg.client_eval_fraction * len(idx)))
    clients = load_splits(cfg, seed).clients
    return clients.subset(np.sort(idx[n_eval:])), clients.subset(np.sort(idx[:n_eval]))
