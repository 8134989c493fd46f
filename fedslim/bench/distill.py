"""Distillation benchmark: does the federation's compact student hold up?

Three real federations per seed (digits, Dirichlet alpha 0.5 by default):

1. ``distill``: FedAvg on the global model + a distilled student (uncompressed uplink);
2. ``student-fedavg``: plain FedAvg trained directly on the student architecture
   (the comparison FedDF makes), same rounds;
3. ``distill + compression``: as 1 with the uplink compressed (default: the setting
   selected on validation in ``fedslim.bench.comm``).

    python -m fedslim.bench.distill --num-clients 10 --rounds 20 --out docs/results/distill

Prints a table and writes ``runs.json``; the student's settings are the config defaults,
fixed in advance; test accuracy is only reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedslim.bench.runner import simulate_subprocess

COMPRESSED = {"uplink": "topk:0.01|q:4", "server-opt": "avgm", "server-momentum": 0.5}


def settings(student: str) -> dict[str, dict[str, Any]]:
    return {
        "distill": {"distill": True},
        "student-fedavg": {"model": student},
        "distill + compression": {"distill": True, **COMPRESSED},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--student", default="digits_student")
    p.add_argument("-c", "--run-config", action="append", default=[])
    p.add_argument("--out", type=Path, default=Path("outputs/bench_distill"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = settings(args.student)
    rows = []
    with Progress() as progress:
        task = progress.add_task("federations", total=len(runs) * len(args.seeds))
        for seed in args.seeds:
            for name, ov in runs.items():
                progress.update(task, description=f"{name} (seed {seed})")
                res, wall = simulate_subprocess({**ov, "seed": seed, "student-model":
                                                 args.student}, args.num_clients,
                                                args.rounds, args.run_config)
                final = res.final
                if final is None:
                    raise RuntimeError(f"{name} (seed {seed}) ended without final results")
                st, comm = final.student, final.comm
                rows.append({
                    "setting": name, "seed": seed, "wall_seconds": wall,
                    "global_test_accuracy": final.test_accuracy,
                    "global_params": res.model["num_params"],
                    "student_test_accuracy": st.test_accuracy if st else None,
                    "student_int8_test_accuracy": st.int8_test_accuracy if st else None,
                    "student_params": st.params if st else None,
                    "student_param_fraction": st.param_fraction_of_global if st else None,
                    "student_bytes": st.file_bytes if st else None,
                    "student_int8_bytes": st.int8_file_bytes if st else None,
                    "uplink_ratio": comm.uplink_ratio if comm else None,
                    "uplink_mb": comm.uplink_bytes / 1e6 if comm else 0.0,
                    "distill_seconds": sum(r.distill.distill_seconds for r in res.rounds
                                           if r.distill is not None),
                })
                progress.advance(task)
    (args.out / "runs.json").write_text(json.dumps(rows, indent=2))
    _print(rows, runs, args)
    print(f"wrote {args.out}/runs.json")


def _print(rows: list[dict[str, Any]], runs: dict[str, Any], args: argparse.Namespace) -> None:
    table = Table(title=f"{args.num_clients} clients, {args.rounds} rounds, seeds {args.seeds}")
    for col in ("setting", "seed", "global acc", "student acc", "student int8 acc",
                "student params", "uplink MB", "uplink x", "distill s"):
        table.add_column(col)

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in rows:
        table.add_row(r["setting"], str(r["seed"]), f(r["global_test_accuracy"], ".4f"),
                      f(r["student_test_accuracy"], ".4f"),
                      f(r["student_int8_test_accuracy"], ".4f"),
                      f(r["student_params"], "d"), f(r["uplink_mb"], ".3f"),
                      f(r["uplink_ratio"], ".1f"),
                      f(r["distill_seconds"], ".1f"))
    console = Console(width=140)
    console.print(table)
    means = Table(title="means over seeds")
    for col in ("setting", "global acc", "student acc", "student int8 acc", "uplink MB"):
        means.add_column(col)

    def mean(name: str, key: str) -> float | None:
        vals = [r[key] for r in rows if r["setting"] == name and r[key] is not None]
        return sum(vals) / len(vals) if vals else None

    for name in runs:
        means.add_row(name, *(f(mean(name, k), ".4f") for k in (
            "global_test_accuracy", "student_test_accuracy", "student_int8_test_accuracy")),
            f(mean(name, "uplink_mb"), ".3f"))
    console.print(means)


if __name__ == "__main__":
    main()
