"""The server/client split of a data set, normalization, and client partitioning.

The labelled pool a data set loads (:mod:`fedslim.task.datasets`) is split once,
deterministically by seed, into:

* ``test``  - server-held, labelled; only *reported*, never used to choose anything (a data
  set's own test split when it has one and ``keep-test-split`` is on);
* ``val``   - server-held, labelled; for early stopping / model selection;
* ``proxy`` - server-held, *unlabelled* (labels are dropped here, not just ignored):
  the inputs distillation trains the student on;
* ``clients`` - everything else, partitioned across clients by a registered partitioner
  (flwr-datasets' IID, Dirichlet label skew, pathological k-classes-per-client, or yours).

``normalize=standardize`` rescales every feature by the mean and standard deviation of the
*clients'* split (the training data), applied to all splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from fedslim.config import DataConfig
from fedslim.errors import DataError
from fedslim.registry import Registry
from fedslim.task.arrays import ArrayData
from fedslim.task.datasets import load

__all__ = ["ArrayData", "PARTITIONERS", "Splits", "client_data", "load_splits",
           "partition_indices", "register_partitioner", "split_pool"]


@dataclass(frozen=True)
class Splits:
    """The server's held-out sets plus the pool that clients partition."""

    clients: ArrayData
    val: ArrayData
    test: ArrayData
    proxy_x: np.ndarray  # unlabelled on purpose
    num_classes: int
    input_shape: tuple[int, ...]


# --------------------------------------------------------------------------- splits
def split_pool(pool: ArrayData, cfg: DataConfig, seed: int,
               test: ArrayData | None = None) -> Splits:
    """Deterministic split of the pool into clients / val / test / proxy (labels dropped).

    With ``test`` given (a data set's own test split), the pool only yields clients, val
    and proxy; ``test-fraction`` is then not used.
    """
    n = len(pool)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = 0 if test is not None else max(1, int(round(cfg.test_fraction * n)))
    n_val = int(round(cfg.val_fraction * n))
    n_proxy = int(round(cfg.proxy_fraction * n))
    if n - n_test - n_val - n_proxy < 1:
        raise DataError(f"pool of {n} examples leaves nothing for clients")
    test_idx = perm[:n_test]
    val_idx = perm[n_test:n_test + n_val]
    proxy_idx = perm[n_test + n_val:n_test + n_val + n_proxy]
    client_idx = np.sort(perm[n_test + n_val + n_proxy:])
    clients = pool.subset(client_idx)
    held_out = test if test is not None else pool.subset(test_idx)
    labels = np.concatenate([pool.y, held_out.y])
    scale = _normalizer(clients.x, cfg.normalize)
    return Splits(
        clients=scale(clients),
        val=scale(pool.subset(val_idx)),
        test=scale(held_out),
        proxy_x=scale(ArrayData(pool.x[proxy_idx], pool.y[proxy_idx])).x,
        num_classes=int(labels.max()) + 1,
        input_shape=tuple(int(d) for d in pool.x.shape[1:]),
    )


def _normalizer(train_x: np.ndarray, how: str) -> Callable[[ArrayData], ArrayData]:
    """Per-feature standardization with the training split's statistics (or identity)."""
    if how == "none":
        return lambda data: data
    mean = train_x.mean(axis=0, dtype=np.float64)
    std = train_x.std(axis=0, dtype=np.float64)
    std = np.where(std > 1e-12, std, 1.0)  # constant features: centred, not divided by 0
    mean32, inv32 = mean.astype(np.float32), (1.0 / std).astype(np.float32)
    return lambda data: ArrayData(((data.x - mean32) * inv32).astype(np.float32), data.y)


@lru_cache(maxsize=4)
def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Load the configured data set and split it (cached per process: clients call it often)."""
    loaded = load(cfg, seed)
    return split_pool(loaded.pool, cfg, seed, loaded.test)


# --------------------------------------------------------------------------- partitions
PartitionerFactory = Callable[[DataConfig, int, int], Any]
PARTITIONERS: Registry[PartitionerFactory] = Registry("partitioner")
register_partitioner = PARTITIONERS.register
"""Register ``factory(cfg, num_partitions, seed)`` returning a flwr-datasets Partitioner
(its dataset has a ``label`` column); used as ``partitioning=<name>``."""


@register_partitioner("iid")
def _iid(cfg: DataConfig, num_partitions: int, seed: int) -> Any:
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=num_partitions)


@register_partitioner("dirichlet")
def _dirichlet(cfg: DataConfig, num_partitions: int, seed: int) -> Any:
    from flwr_datasets.partitioner import DirichletPartitioner

    return DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                alpha=cfg.dirichlet_alpha, min_partition_size=2,
                                self_balancing=False, shuffle=True, seed=seed)


@register_partitioner("pathological")
def _pathological(cfg: DataConfig, num_partitions: int, seed: int) -> Any:
    from flwr_datasets.partitioner import PathologicalPartitioner

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
    part = PARTITIONERS[cfg.partitioning](cfg, num_partitions, seed)
    part.dataset = table
    out = []
    for pid in range(num_partitions):
        try:
            rows = part.load_partition(pid)["row"]
        except ValueError as exc:  # e.g. Dirichlet cannot satisfy the minimum size
            raise DataError(f"partitioning {cfg.partitioning} into {num_partitions} "
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
