"""A plain Flower app -- no fedslim code -- for side-by-side benchmarks (bench.scale).

The same workload as ``fedslim simulate -c dataset=synthetic -c partitioning=iid``: class-
conditional Gaussian 8x8 images, the digits CNN architecture, 2 local epochs of SGD
(lr 0.05, momentum 0.9, batch 16), Flower's own FedAvg, central evaluation on a held-out
20%. Written as in Flower's quickstart; the harness passes its few settings through
``STOCK_*`` environment variables (``run_simulation`` has no run config). It counts the
bytes of every message it sends and receives with Flower's own serialization.

    python -m fedslim.bench.stock_app OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from torch import nn

SEED = int(os.environ.get("STOCK_SEED", "42"))
SAMPLES = int(os.environ.get("STOCK_SAMPLES", "40000"))
ROUNDS = int(os.environ.get("STOCK_ROUNDS", "20"))
FRACTION = float(os.environ.get("STOCK_FRACTION", "0.1"))
CLIENTS = int(os.environ.get("STOCK_CLIENTS", "1000"))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.AdaptiveMaxPool2d((4, 4)))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(inplace=True),
                                  nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    prototypes = rng.normal(0.0, 1.0, (10, 1, 8, 8))
    y = rng.integers(0, 10, SAMPLES)
    x = prototypes[y] + rng.normal(0.0, 1.5, (SAMPLES, 1, 8, 8))
    return x.astype(np.float32), y.astype(np.int64)


def split() -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(SEED).permutation(SAMPLES)
    n_test = SAMPLES // 5
    return perm[:n_test], perm[n_test:]


def size(msg: Message) -> int:
    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    x, y = data()
    _, pool = split()
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    idx = np.array_split(pool, n)[pid]
    model = Net()
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(SEED + pid)
    xs, ys = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
    for _ in range(2):
        perm = torch.randperm(len(idx), generator=gen)
        for i in range(0, len(idx), 16):
            b = perm[i:i + 16]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xs[b]), ys[b]).backward()
            opt.step()
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"num-examples": len(idx)})})
    return Message(content=reply, reply_to=msg)


class CountingFedAvg(FedAvg):
    """Flower's FedAvg; only counts the bytes of what it sends and receives."""

    bytes_total = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        self.bytes_total += sum(size(m) for m in msgs)
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.bytes_total += sum(size(m) for m in replies)
        return super().aggregate_train(server_round, replies)


def make_server(out: str) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        x, y = data()
        test, _ = split()
        xt, yt = torch.from_numpy(x[test]), torch.from_numpy(y[test])
        torch.manual_seed(SEED)
        strategy = CountingFedAvg(fraction_train=FRACTION, fraction_evaluate=0.0,
                                  min_train_nodes=2, min_available_nodes=2)
        t0 = time.perf_counter()
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                                num_rounds=ROUNDS, train_config=ConfigRecord())
        model = Net()
        model.load_state_dict(result.arrays.to_torch_state_dict())
        with torch.no_grad():
            acc = float((model(xt).argmax(1) == yt).float().mean())
        with open(out, "w") as fh:
            json.dump({"test_accuracy": acc, "total_bytes": strategy.bytes_total,
                       "fl_seconds": time.perf_counter() - t0}, fh)

    return server


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_simulation(server_app=make_server(sys.argv[1]), client_app=client,
                   num_supernodes=CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "ERROR",
                                                 "log_to_driver": False}})
