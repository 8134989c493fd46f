"""A bare PyTorch FedAvg loop: same data, model, local training and seeds as the Flower apps.

Used (1) as the reference for framework overhead (``fedslim bench overhead`` times this
against the real Flower federation) and (2) as a sanity check of reachable accuracy.
No Flower, no processes, no serialization: clients train one after another in this process.

    python -m fedslim.bench.baseline --rounds 20 --num-clients 10
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fedslim.config import RunConfig, parse_cli_overrides, parse_run_config
from fedslim.task.data import client_data, load_splits
from fedslim.task.models import build_model
from fedslim.task.train import evaluate, select_device, train_local


def run_bare_fedavg(cfg: RunConfig, num_clients: int) -> dict[str, object]:
    """Full-participation FedAvg weighted by example count; returns accuracy and timings."""
    seed = cfg.fed.seed
    splits = load_splits(cfg.data, seed)
    device = select_device(cfg.train.device)
    torch.manual_seed(seed)
    global_model = build_model(cfg.train.model, splits.input_shape, splits.num_classes)
    local = build_model(cfg.train.model, splits.input_shape, splits.num_classes)
    data = [client_data(cfg.data, seed, pid, num_clients)[0] for pid in range(num_clients)]
    history, train_seconds = [], 0.0
    t0 = time.perf_counter()
    for rnd in range(1, cfg.fed.num_server_rounds + 1):
        global_state = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
        acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_state.items()}
        total = 0
        for pid in range(num_clients):
            local.load_state_dict(global_state)
            stats = train_local(local, data[pid], cfg.train, server_round=rnd,
                                seed_parts=(seed, pid), device=device)
            train_seconds += stats.seconds
            for k, v in local.state_dict().items():
                acc[k] += v.detach().to("cpu", torch.float64) * stats.num_examples
            total += stats.num_examples
        global_model.load_state_dict({k: (v / total).to(global_state[k].dtype)
                                      for k, v in acc.items()})
        ev = evaluate(global_model, splits.test, device)
        val = evaluate(global_model, splits.val, device)
        history.append({"round": rnd, "test_accuracy": ev.accuracy, "test_loss": ev.loss,
                        "val_accuracy": val.accuracy})
    return {"final_test_accuracy": history[-1]["test_accuracy"],
            "final_val_accuracy": history[-1]["val_accuracy"], "rounds": history,
            "wall_seconds": time.perf_counter() - t0, "train_seconds": train_seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("-c", "--run-config", action="append", default=[],
                   help="key=value run-config override (repeatable)")
    args = p.parse_args(argv)
    overrides = parse_cli_overrides(args.run_config)
    overrides["num-server-rounds"] = str(args.rounds)
    cfg = parse_run_config(overrides=overrides)
    out = run_bare_fedavg(cfg, args.num_clients)
    print(json.dumps({k: v for k, v in out.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
