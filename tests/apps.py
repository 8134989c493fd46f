"""A tiny ClientApp written as in Flower's PyTorch quickstart (no fedslim code in it).

It reads the global weights from ``msg.content["arrays"]`` and the learning rate from
``msg.content["config"]["lr"]``, trains a small MLP on its own fixed data and replies with
an ``ArrayRecord`` of weights and a ``MetricRecord`` with ``num-examples``. Tests add
fedslim's ``compression_mod`` to it and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from torch import nn

NODES = 4

# Stock Flower strategies (and a DP wrapper) that tests wrap in fedslim's Compressed.
STACKS: dict[str, Callable[[], Strategy]] = {
    "fedavg": lambda: FedAvg(),
    "fedadam": lambda: FedAdam(eta=0.05),
    "fedprox": lambda: FedProx(proximal_mu=0.1),
    "fedtrimmedavg": lambda: FedTrimmedAvg(beta=0.25),
    "krum": lambda: Krum(num_malicious_nodes=1),
    "dp-server-fixed-clipping": lambda: DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=0.01, clipping_norm=10.0, num_sampled_clients=NODES),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 128)
        self.fc2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def load_data(partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + partition_id)
    protos = torch.randn(4, 16, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 4, (64,), generator=gen)
    x = protos[y] + 0.5 * torch.randn(64, 16, generator=gen)
    return x, y


def initial_arrays(seed: int = 0) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(Net().state_dict())


def make_quickstart_app(mods: list[Mod] | None = None) -> ClientApp:
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        lr = float(msg.content["config"]["lr"])  # type: ignore[arg-type]
        x, y = load_data(int(context.node_config["partition-id"]))
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for i in range(0, len(x), 16):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i:i + 16]), y[i:i + 16])
            loss.backward()
            opt.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"train_loss": float(loss),
                                                       "num-examples": len(x)})})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = load_data(int(context.node_config["partition-id"]))
        with torch.no_grad():
            acc = float((model(x).argmax(1) == y).float().mean())
        content = RecordDict({"metrics": MetricRecord({"eval_acc": acc,
                                                       "num-examples": len(x)})})
        return Message(content=content, reply_to=msg)

    return app
