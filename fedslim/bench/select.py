"""How ``auto``'s level was chosen: candidates on ONE workload's validation split.

    python -m fedslim.bench.select --seeds 42 1 2 --out docs/results/select

Runs the digits CNN (the selection workload; 10 clients, Dirichlet 0.5, 30 rounds, Flower's
FedAvg) with ``uplink=none`` and with each candidate level of the ``auto`` pipeline in both
directions, and picks by a rule fixed in advance: the **highest** energy (the most faithful
updates) whose total traffic is at least ``--min-total-ratio`` (100x: the digits CNN's
headline) smaller than ``none``'s and whose mean validation accuracy is within
``--tolerance-pp`` (1 pp) of ``none``'s. Only validation accuracy is used; the other four
workloads of :mod:`fedslim.bench.suite` then report the pick unchanged.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from fedslim.bench.suite import WORKLOADS, federation

WORKLOAD = "digits_cnn"
STRATEGY = {"strategy": "fedavg"}
CANDIDATES = {f"auto:energy={e}": e for e in (0.3, 0.4, 0.5, 0.6)}


def pick(rows: list[dict[str, Any]], min_total_ratio: float, tolerance_pp: float
         ) -> tuple[list[dict[str, Any]], str | None]:
    """Per candidate: mean val, total reduction vs ``none`` (per seed); and the pick."""
    none = {r["seed"]: r for r in rows if r["setting"] == "none"}
    base_val = statistics.mean(r["val_accuracy"] for r in none.values())
    table = []
    for name in dict.fromkeys(r["setting"] for r in rows if r["setting"] != "none"):
        rs = [r for r in rows if r["setting"] == name and r["seed"] in none]
        table.append({
            "setting": name, "energy": CANDIDATES.get(name),
            "val": statistics.mean(r["val_accuracy"] for r in rs),
            "val_minus_none_pp": 100 * (statistics.mean(r["val_accuracy"] for r in rs)
                                        - base_val),
            "total_ratio": statistics.mean(none[r["seed"]]["total_bytes"] / r["total_bytes"]
                                           for r in rs)})
    ok = [t for t in table if t["total_ratio"] >= min_total_ratio
          and t["val_minus_none_pp"] >= -tolerance_pp and t["energy"] is not None]
    chosen = max(ok, key=lambda t: t["energy"])["setting"] if ok else None
    return table, chosen


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--min-total-ratio", type=float, default=100.0)
    p.add_argument("--tolerance-pp", type=float, default=1.0)
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=WORKLOADS[WORKLOAD].rounds)
    p.add_argument("--out", type=Path, default=Path("outputs/bench_select"))
    args = p.parse_args(argv)
    settings: dict[str, dict[str, Any]] = {"none": {"uplink": "none"}}
    settings.update({name: {"uplink": name, "downlink": name} for name in CANDIDATES})
    rows = []
    for seed in args.seeds:
        for name, overrides in settings.items():
            run = federation({**WORKLOADS[WORKLOAD].overrides, **STRATEGY, **overrides,
                              "seed": seed}, args.rounds, 1, args.num_clients, [])
            rows.append({"setting": name, "seed": seed, **run})
            print(f"{name} seed {seed}: val {run['val_accuracy']:.4f}, "
                  f"{run['total_bytes'] / 1e6:.2f} MB", flush=True)
    table, chosen = pick(rows, args.min_total_ratio, args.tolerance_pp)
    print(f"\n{WORKLOAD}, seeds {args.seeds}, rule: highest energy with total x >= "
          f"{args.min_total_ratio:g} and val within {args.tolerance_pp:g} pp of none")
    for t in table:
        print(f"  {t['setting']:<20} val {t['val']:.4f} ({t['val_minus_none_pp']:+.2f} pp) "
              f"total x{t['total_ratio']:.1f}" + ("   <- chosen" if t["setting"] == chosen
                                                  else ""))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "select.json").write_text(json.dumps(
        {"rows": rows, "table": table, "chosen": chosen, "rule": {
            "min_total_ratio": args.min_total_ratio, "tolerance_pp": args.tolerance_pp}},
        indent=1))
    print(f"wrote {args.out}/select.json")


if __name__ == "__main__":
    main()
