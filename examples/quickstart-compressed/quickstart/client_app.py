"""The ClientApp: Flower's quickstart, plus ONE line for fedslim (the mod)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedslim.client import compression_mod  # fedslim
from quickstart.task import Net, load_data, test
from quickstart.task import train as train_fn

app = ClientApp(mods=[compression_mod])  # fedslim: was `ClientApp()`


@app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    seed = int(context.run_config["seed"])
    torch.manual_seed(seed + 1000 * int(msg.content["config"]["server-round"]))
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loader = load_data(int(context.node_config["partition-id"]),
                       int(context.node_config["num-partitions"]),
                       int(context.run_config["batch-size"]), seed)
    loss = train_fn(model, loader, int(context.run_config["local-epochs"]),
                    float(msg.content["config"]["lr"]))
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": loss, "num-examples": len(loader.dataset)}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loader = load_data(int(context.node_config["partition-id"]),
                       int(context.node_config["num-partitions"]),
                       int(context.run_config["batch-size"]), int(context.run_config["seed"]))
    loss, accuracy = test(model, loader.dataset)  # type: ignore[arg-type]
    content = RecordDict({"metrics": MetricRecord({
        "eval_loss": loss, "eval_acc": accuracy, "num-examples": len(loader.dataset)})})
    return Message(content=content, reply_to=msg)
