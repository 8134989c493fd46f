"""The ServerApp: Flower's quickstart, plus ONE wrapper for fedslim (``Compressed``).

``Compressed(FedAvg(...))`` with no arguments is fedslim's default, ``uplink="auto"`` and
``downlink="auto"``. ``compress=false`` (run config) runs the stock baseline instead: the
same messages as without fedslim (``uplink="none"``, ``downlink="none"``), counted by the
same byte ledger. ``results`` names a JSON file for the benchmark: final accuracies and
the bytes fedslim's ledger counted.
"""

from __future__ import annotations

import dataclasses
import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

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
        (val_loss, val_acc), (_, test_acc) = test(net, val), test(net, test_set)
        return MetricRecord({"val-loss": val_loss, "val-accuracy": val_acc,
                             "test-accuracy": test_acc})

    fedavg = FedAvg(fraction_train=float(cfg["fraction-train"]),
                    fraction_evaluate=float(cfg["fraction-evaluate"]))
    if cfg["compress"]:
        strategy = Compressed(fedavg)  # fedslim: the one line on the server
    else:  # the stock baseline, counted the same way: plain messages both ways
        strategy = Compressed(fedavg, uplink="none", downlink="none")
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()),
                            num_rounds=int(cfg["num-server-rounds"]),
                            train_config=ConfigRecord({"lr": float(cfg["learning-rate"])}),
                            evaluate_fn=evaluate)
    strategy.collector.close()
    if cfg["results"]:
        history = strategy.collector.history
        curve = [{"round": r, **dict(m)} for r, m in
                 sorted(result.evaluate_metrics_serverapp.items()) if r > 0]
        comm = [dataclasses.asdict(r.comm) for r in history if r.comm]
        with open(str(cfg["results"]), "w") as fh:
            json.dump({"final": dict(result.evaluate_metrics_serverapp[
                int(cfg["num-server-rounds"])]), "curve": curve, "comm": comm,
                "rejects": sum(len(r.rejects) for r in history)}, fh)
