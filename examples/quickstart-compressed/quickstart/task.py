"""Model, data and training loops, as in Flower's PyTorch quickstart (no fedslim here).

Flower's quickstart trains its ``Net`` on CIFAR-10 (3x32x32) split IID across the nodes;
nothing can be downloaded here, so the data are scikit-learn's digits upsampled to 3x32x32
and normalized as the quickstart normalizes CIFAR. The rest is the quickstart's: the same
``Net`` (62,006 parameters), SGD with momentum 0.9, IID partitions.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from datasets import Dataset
from flwr_datasets.partitioner import IidPartitioner
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """Model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz'), as in the quickstart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(functional.relu(self.conv1(x)))
        x = self.pool(functional.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = functional.relu(self.fc1(x))
        x = functional.relu(self.fc2(x))
        return self.fc3(x)


@lru_cache(maxsize=1)
def _images() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as (N, 3, 32, 32) float32 in [-1, 1], and their labels."""
    digits = load_digits()
    x = torch.from_numpy((digits.images.astype(np.float32) / 16.0)[:, None])
    x = functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = ((x.clamp(0, 1) - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    return x.numpy(), digits.target.astype(np.int64)


def _split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices: 80% for the nodes, 10% validation, 10% test (held by the server)."""
    n = len(_images()[1])
    order = np.random.default_rng(seed).permutation(n)
    return order[2 * (n // 10):], order[:n // 10], order[n // 10:2 * (n // 10)]


def _tensors(rows: np.ndarray) -> TensorDataset:
    x, y = _images()
    return TensorDataset(torch.from_numpy(x[rows]), torch.from_numpy(y[rows]))


def load_data(partition_id: int, num_partitions: int, batch_size: int, seed: int
              ) -> DataLoader:
    """This node's IID share of the pool (Flower's IidPartitioner), shuffled by seed."""
    pool = _split(seed)[0]
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = Dataset.from_dict({"row": pool.tolist()})
    rows = np.asarray(partitioner.load_partition(partition_id)["row"], dtype=np.int64)
    return DataLoader(_tensors(rows), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed + partition_id))


def load_server_data(seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(validation, test) sets, held by the server."""
    _, val, test = _split(seed)
    return _tensors(val), _tensors(test)


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
