"""The ServerApp: Flower's quickstart, plus ONE wrapper for fedslim (``Compressed``).

``results`` (run config) names a JSON file for the benchmark: final accuracies and the
bytes fedslim's ledger counted.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedAvgM

from fedslim.strategies import Compressed  # fedslim
from quickstart.task import Net, load_server_data, test

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    torch.manual_seed(int(cfg["seed"]))
    val, test_set = load_server_data(int(cfg["seed"]))

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net = Net()
        net.load_state_dict(arrays.to_torch_state_dict())
        (_, val_acc), (_, test_acc) = test(net, val), test(net, test_set)
        return MetricRecord({"val-accuracy": val_acc, "test-accuracy": test_acc})

    momentum = float(cfg["server-momentum"])
    sampling = {"fraction_train": float(cfg["fraction-train"]), "fraction_evaluate": 0.0}
    inner = FedAvgM(**sampling, server_momentum=momentum) if momentum > 0 else FedAvg(**sampling)
    strategy = Compressed(inner, uplink=str(cfg["uplink"]))  # fedslim: wrap the strategy
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            num_rounds=int(cfg["num-server-rounds"]),
                            train_config=ConfigRecord({"lr": float(cfg["lr"])}),
                            evaluate_fn=evaluate)
    strategy.collector.close()
    if cfg["results"]:
        final = result.evaluate_metrics_serverapp[int(cfg["num-server-rounds"])]
        comm = [dataclasses.asdict(r.comm) for r in strategy.collector.history if r.comm]
        with open(str(cfg["results"]), "w") as fh:
            json.dump({"final": dict(final), "comm": comm,
                       "rejects": sum(len(r.rejects) for r in strategy.collector.history)}, fh)
