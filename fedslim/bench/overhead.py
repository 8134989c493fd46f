"""Framework overhead: the Flower federation vs a bare PyTorch FedAvg loop, same everything.

Both use the same data split, partitions, model, seeds and local training code; the
difference is Flower (simulation engine, Ray actors, message serialization, the server's
per-round central evaluation and checkpointing).

    python -m fedslim.bench.overhead --num-clients 10 --rounds 20 [--json out.json]

Prints wall seconds of each, their ratio, the per-round steady-state ratio (round 1
includes Ray actor start-up and imports), and both final test accuracies.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedslim.bench.baseline import run_bare_fedavg
from fedslim.bench.runner import simulate_subprocess
from fedslim.config import parse_cli_overrides, parse_run_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("-c", "--run-config", action="append", default=[])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    overrides = parse_cli_overrides(args.run_config)
    overrides["num-server-rounds"] = str(args.rounds)
    cfg = parse_run_config(overrides=overrides)

    bare = run_bare_fedavg(cfg, args.num_clients)
    res, flower_wall = simulate_subprocess({}, args.num_clients, args.rounds, args.run_config)
    if res.final is None:
        raise RuntimeError("the Flower run ended without final results")
    rounds = res.rounds
    steady = sum(r.round_seconds for r in rounds[1:]) / max(len(rounds) - 1, 1)
    bare_wall = float(bare["wall_seconds"])  # type: ignore[arg-type]
    bare_per_round = bare_wall / args.rounds
    out = {
        "num_clients": args.num_clients, "rounds": args.rounds,
        "bare_wall_seconds": bare["wall_seconds"],
        "flower_wall_seconds_incl_startup": flower_wall,
        "flower_fl_seconds": res.final.fl_seconds,
        "ratio_wall": flower_wall / bare_wall,
        "ratio_fl_loop": res.final.fl_seconds / bare_wall,
        "bare_seconds_per_round": bare_per_round,
        "flower_seconds_per_round_steady": steady,
        "ratio_steady_round": steady / bare_per_round,
        "bare_final_test_accuracy": bare["final_test_accuracy"],
        "flower_final_test_accuracy": res.final.test_accuracy,
    }
    for k, v in out.items():
        print(f"{k:36s} {v:.4f}" if isinstance(v, float) else f"{k:36s} {v}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
