"""Benchmark: this stock-Flower quickstart app, with and without fedslim's compression.

    python bench.py --seeds 42 1 2 --out ../../docs/results/quickstart

Runs the app with `flwr run` (simulation, 10 SuperNodes, 20 rounds) for each seed, once as
stock Flower (`compress=false`: plain messages both ways) and once with the two lines as
documented and no arguments (`compress=true`: `Compressed(FedAvg(...))`, fedslim's
defaults), and prints total traffic (every message both ways, as Flower serialized it,
counted by fedslim's ledger in both runs), its reduction, bytes to 99% of stock's final
validation accuracy, and the server's test accuracy.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
from pathlib import Path

from fedslim.bench.targets import Curve, bytes_to_target_ratio
from fedslim.deploy.simulation import LocalSimulation

HERE = Path(__file__).resolve().parent
SETTINGS = {"stock Flower FedAvg": {"compress": False},
            "+ compression_mod + Compressed(FedAvg()) (defaults)": {"compress": True}}


def _total(comm: dict[str, int]) -> int:
    return (comm["uplink_bytes"] + comm["uplink_eval_bytes"] + comm["downlink_bytes"]
            + comm["downlink_eval_bytes"])


def run(sim: LocalSimulation, tmp: Path, setting: dict[str, object], seed: int,
        rounds: int, num_clients: int) -> dict[str, object]:
    out = tmp / f"{seed}-{setting['compress']}.json"
    sim.run(HERE, {**setting, "seed": seed, "num-server-rounds": rounds,
                   "results": str(out)}, num_supernodes=num_clients, done=out.exists)
    res = json.loads(out.read_text())
    totals, spent = [], 0
    for comm in res["comm"]:
        spent += _total(comm)
        totals.append(spent)
    return {"seed": seed, "total_bytes": spent, "rejects": res["rejects"],
            "val_accuracy": res["final"]["val-accuracy"],
            "test_accuracy": res["final"]["test-accuracy"],
            "curve": [{"val_accuracy": c["val-accuracy"], "test_accuracy": c["test-accuracy"],
                       "total_bytes": t} for c, t in zip(res["curve"], totals, strict=True)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    # SIGTERM unwinds like Ctrl-C, so LocalSimulation stops every process it started
    # (the default action would end this process alone and orphan the simulation).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalSimulation(Path(tmp) / "sim") as sim:
        for seed in args.seeds:
            for name, setting in SETTINGS.items():
                row = {"setting": name, **run(sim, Path(tmp), setting, seed, args.rounds,
                                               args.num_clients)}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    stock = {r["seed"]: r for r in rows if r["setting"] == next(iter(SETTINGS))}
    print(f"\n{args.num_clients} clients, {args.rounds} rounds, seeds {args.seeds}:")
    for name in SETTINGS:
        rs = [r for r in rows if r["setting"] == name]
        acc = [r["test_accuracy"] for r in rs]
        ratio = [stock[r["seed"]]["total_bytes"] / r["total_bytes"] for r in rs]
        diff = [100 * (r["test_accuracy"] - stock[r["seed"]]["test_accuracy"]) for r in rs]
        to_target = [bytes_to_target_ratio(Curve.from_rows(r["curve"]),
                                           Curve.from_rows(stock[r["seed"]]["curve"]))
                     for r in rs]
        print(f"  {name}: total {statistics.mean(r['total_bytes'] for r in rs) / 1e6:.3f} MB,"
              f" x{statistics.mean(ratio):.1f} (per seed {', '.join(f'{x:.1f}' for x in ratio)})"
              f", test acc {statistics.mean(acc):.4f} (sd {statistics.pstdev(acc):.4f}), vs "
              f"stock {statistics.mean(diff):+.2f} pp (per seed "
              f"{', '.join(f'{d:+.2f}' for d in diff)}), bytes to 99% of stock's val "
              f"accuracy: x{', x'.join('never' if t is None else f'{t:.1f}' for t in to_target)}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runs.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
