"""Benchmark: this stock-Flower quickstart app, with and without fedslim's compression.

    python bench.py --seeds 42 1 2 --out ../../docs/results/quickstart

Runs the app with `flwr run` (simulation, 10 SuperNodes, 20 rounds) for each seed, once as
stock Flower (uplink=none, FedAvg) and once compressed (uplink=topk:0.01|q:4, FedAvgM 0.5:
the setting fedslim's own comm benchmark selected on validation data), and prints uplink
bytes, the reduction and the server's test accuracy. Bytes are fedslim's ledger: every
reply as Flower serialized it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from fedslim.deploy.simulation import LocalSimulation

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "stock Flower FedAvg (uplink=none)": {"uplink": "none", "server-momentum": 0.0},
    "+ compression_mod + Compressed (topk:0.01|q:4, FedAvgM 0.5)": {
        "uplink": "topk:0.01|q:4", "server-momentum": 0.5},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalSimulation(Path(tmp) / "sim") as sim:
        for seed in args.seeds:
            for name, setting in SETTINGS.items():
                out = Path(tmp) / f"{seed}-{len(rows)}.json"
                sim.run(HERE, {**setting, "seed": seed, "num-server-rounds": args.rounds,
                               "results": str(out)}, num_supernodes=args.num_clients,
                        done=out.exists)
                res = json.loads(out.read_text())
                up = sum(c["uplink_bytes"] for c in res["comm"])
                none = sum(c["uplink_none_bytes"] for c in res["comm"])
                rows.append({"setting": name, "seed": seed, "uplink_bytes": up,
                             "uplink_ratio": none / up, "rejects": res["rejects"],
                             "val_accuracy": res["final"]["val-accuracy"],
                             "test_accuracy": res["final"]["test-accuracy"]})
                print(json.dumps(rows[-1]))
    print(f"\n{args.num_clients} clients, {args.rounds} rounds, seeds {args.seeds}:")
    base = [r for r in rows if r["setting"] == next(iter(SETTINGS))]
    for name in SETTINGS:
        rs = [r for r in rows if r["setting"] == name]
        acc = [r["test_accuracy"] for r in rs]
        diff = [100 * (a["test_accuracy"] - b["test_accuracy"])
                for a, b in zip(rs, base, strict=True)]
        print(f"  {name}: uplink {statistics.mean(r['uplink_bytes'] for r in rs) / 1e6:.3f} MB, "
              f"x{statistics.mean(r['uplink_ratio'] for r in rs):.1f}, test acc "
              f"{statistics.mean(acc):.4f} (sd {statistics.pstdev(acc):.4f}), vs stock "
              f"{statistics.mean(diff):+.2f} pp (per seed {', '.join(f'{d:+.2f}' for d in diff)})")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "runs.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
