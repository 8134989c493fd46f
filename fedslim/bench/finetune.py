"""Federated fine-tuning: pretrain centrally on part of a task, fine-tune federatedly on all.

    python -m fedslim.bench.finetune --seeds 42 1 2 --rounds 10 --out docs/results/finetune

Per seed: the digits CNN is trained centrally on the server-side pool's digits 0-4 only
(``--pretrain-epochs``), saved, and then fine-tuned in real federations (``fedslim
simulate``, 10 clients, Dirichlet 0.5, the defaults: ``auto`` both ways) on all ten digits
with ``init-from`` and each ``trainable`` setting, next to training from scratch. Reports
test accuracy and uplink bytes (train replies, as Flower serialized them) per setting:
mean, spread and per seed; writes ``runs.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from fedslim.bench.runner import simulate_subprocess
from fedslim.config import parse_run_config
from fedslim.server.storage import save_model
from fedslim.task.arrays import ArrayData
from fedslim.task.data import load_splits
from fedslim.task.models import seeded_model
from fedslim.task.train import evaluate, train_local

SETTINGS = ["scratch", "all", "head", "schedule:3", "lora:4", "lora:4 lowrank-uplink"]
"""``trainable`` values (``scratch``: no init-from); ``lora:R lowrank-uplink`` also sets
``uplink=lowrank:R|q:8|ans``, the codec that sends a rank-R update as its factors."""


def pretrain(seed: int, epochs: int, path: Path) -> float:
    """Train on digits 0-4 of the client pool, centrally; save; return test accuracy."""
    cfg = parse_run_config({"seed": seed, "local-epochs": epochs})
    splits = load_splits(cfg.data, seed)
    keep = splits.clients.y < 5
    data = ArrayData(splits.clients.x[keep], splits.clients.y[keep])
    model = seeded_model(cfg.train.model, seed, splits.input_shape, splits.num_classes)
    torch.manual_seed(seed)
    train_local(model, data, cfg.train, server_round=1, seed_parts=(seed, 999),
                device=torch.device("cpu"))
    save_model(path, model.state_dict(), {"model": cfg.train.model, "pretrained": "0-4"})
    return evaluate(model, splits.test, torch.device("cpu")).accuracy


def run(setting: str, seed: int, rounds: int, clients: int, init: Path) -> dict[str, Any]:
    overrides: dict[str, Any] = {"seed": seed, "partitioning": "dirichlet",
                                 "dirichlet-alpha": 0.5}
    if setting != "scratch":
        trainable, _, codec = setting.partition(" ")
        overrides.update({"init-from": str(init), "trainable": trainable})
        if codec == "lowrank-uplink":
            overrides["uplink"] = f"lowrank:{trainable.split(':')[1]}|q:8|ans"
    res, wall = simulate_subprocess(overrides, clients, rounds)
    assert res.final is not None and res.final.comm is not None
    return {"setting": setting, "seed": seed, "test_accuracy": res.final.test_accuracy,
            "uplink_bytes": res.final.comm.uplink_bytes,
            "uplink_none_bytes": res.final.comm.uplink_none_bytes,
            "total_bytes": res.final.comm.total_bytes,
            "curve": [r.central.test.accuracy for r in res.rounds if r.central],
            "wall_seconds": wall}


def summarize(rows: list[dict[str, Any]], pretrained: dict[int, float], rounds: int) -> str:
    seeds = list(dict.fromkeys(r["seed"] for r in rows))  # in the order they were run
    full = {r["seed"]: r for r in rows if r["setting"] == "all"}
    lines = ["| setting | test acc (mean, sd) | vs all (pp, per seed) | uplink MB | "
             "uplink bytes vs all | uplink vs float32 |", "|---|---|---|---|---|---|"]
    for s in dict.fromkeys([*SETTINGS, *(r["setting"] for r in rows)]):
        mine = sorted((r for r in rows if r["setting"] == s),
                      key=lambda r: seeds.index(r["seed"]))
        if not mine:
            continue
        acc = [r["test_accuracy"] for r in mine]
        dpp = [100 * (r["test_accuracy"] - full[r["seed"]]["test_accuracy"]) for r in mine]
        up = statistics.fmean(r["uplink_bytes"] for r in mine)
        fewer = statistics.fmean(full[r["seed"]]["uplink_bytes"] / r["uplink_bytes"]
                                 for r in mine)
        lines.append(
            f"| {s} | {statistics.fmean(acc):.4f} ({statistics.pstdev(acc):.4f}) | "
            f"{statistics.fmean(dpp):+.2f} ({', '.join(f'{d:+.2f}' for d in dpp)}) | "
            f"{up / 1e6:.3f} | {fewer:.2f}x fewer | "
            f"{statistics.fmean(r['uplink_none_bytes'] / r['uplink_bytes'] for r in mine):.0f}x |")
    head = (f"Seeds {', '.join(map(str, seeds))} (per-seed figures in this order); "
            "pretrained on digits 0-4 centrally, test accuracy on all ten digits before "
            "fine-tuning: "
            + ", ".join(f"{pretrained[s]:.4f}" for s in seeds) + f"; {rounds} rounds.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--settings", nargs="+", default=SETTINGS)
    p.add_argument("--append", action="store_true",
                   help="keep the runs already in OUT/runs.json (other settings)")
    p.add_argument("--out", type=Path, default=Path("outputs/bench-finetune"))
    p.add_argument("--work", type=Path, default=Path("outputs/bench-finetune-models"),
                   help="where the pretrained models go (not the results)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    pretrained: dict[int, float] = {}
    runs_file = args.out / "runs.json"
    if args.append and runs_file.exists():  # add settings to an earlier run of this bench
        old = json.loads(runs_file.read_text())
        rows = old["runs"]
        pretrained = {int(k): v for k, v in old["pretrained_test_accuracy"].items()}
    for seed in args.seeds:
        init = (args.work / f"pretrained-{seed}.safetensors").resolve()
        pretrained[seed] = pretrain(seed, args.pretrain_epochs, init)
        for setting in args.settings:
            rows.append(run(setting, seed, args.rounds, args.num_clients, init))
            r = rows[-1]
            print(f"seed {seed} {setting:>11}: test {r['test_accuracy']:.4f}, uplink "
                  f"{r['uplink_bytes'] / 1e6:.3f} MB", flush=True)
    runs_file.write_text(json.dumps(
        {"pretrained_test_accuracy": pretrained, "rounds": args.rounds, "runs": rows},
        indent=2))
    summary = summarize(rows, pretrained, args.rounds)
    (args.out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
