"""Model, data and training loops, as in Flower's PyTorch quickstart (no fedslim here)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """A small CNN for 8x8 digits (151k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool2d((4, 4))
        self.fc1 = nn.Linear(64 * 16, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.pool(x), 1))))


@lru_cache(maxsize=4)
def _split(seed: int) -> tuple[Dataset, TensorDataset, TensorDataset]:
    """80% for the clients, 10% validation, 10% test (held by the server)."""
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_val, n_test = len(y) // 10, len(y) // 10
    val, test, train = order[:n_val], order[n_val:n_val + n_test], order[n_val + n_test:]
    pool = Dataset.from_dict({"x": x[train].reshape(len(train), -1), "label": y[train]})
    as_tensors = lambda idx: TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))  # noqa: E731
    return pool, as_tensors(val), as_tensors(test)


def load_data(partition_id: int, num_partitions: int, seed: int) -> DataLoader:
    """This client's share: Dirichlet(0.5) label skew over the clients' pool."""
    pool, _, _ = _split(seed)
    partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                       alpha=0.5, seed=seed, min_partition_size=5)
    partitioner.dataset = pool
    part = partitioner.load_partition(partition_id).with_format("numpy")[:]
    data = TensorDataset(torch.from_numpy(part["x"].astype(np.float32).reshape(-1, 1, 8, 8)),
                         torch.from_numpy(part["label"].astype(np.int64)))
    return DataLoader(data, batch_size=16, shuffle=True,
                      generator=torch.Generator().manual_seed(seed + partition_id))


def load_server_data(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(validation, test) sets, held by the server."""
    _, val, test = _split(seed)
    return val, test


def train(net: Net, loader: DataLoader, epochs: int, lr: float) -> float:
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total, n = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            total, n = total + float(loss) * len(y), n + len(y)
    return total / max(n, 1)


@torch.no_grad()
def test(net: Net, data: TensorDataset) -> tuple[float, float]:
    net.eval()
    x, y = data.tensors
    logits = net(x)
    accuracy = (logits.argmax(1) == y).float().mean()
    return float(nn.functional.cross_entropy(logits, y)), float(accuracy)
