"""The workload suite: every compression claim on five models of different shape and size.

    python -m fedslim.bench.suite --seeds 42 1 2 --out docs/results/suite

Each cell is a real federation (``fedslim simulate`` in a subprocess: 10 clients, Dirichlet
0.5) of one workload, one strategy (Flower's FedAvg, FedAdam, FedProx), one compression
setting and one seed. Per workload the round count is where plain FedAvg has converged
(``none`` is run to convergence, not truncated), and every setting runs as many rounds.

``auto`` also runs twice as many rounds (it costs ~1/100 of the bytes per round), so that
its bytes to the target are measured where it gets there later than ``none``; the figures
"at round R" use the first R rounds of that run. Reported per (workload, strategy,
setting), means over seeds with per-seed figures:

* validation / test accuracy at round R, and test accuracy minus ``none``'s (same seed);
* total traffic over R rounds (every message both ways, as Flower serialized it) and its
  reduction;
* **bytes to target**: the cumulative bytes at which the run first reached 99% of
  ``none``'s final validation accuracy, as a reduction against ``none``'s own bytes to it
  (:mod:`fedslim.bench.targets`);
* **accuracy at equal bytes**: the accuracy a run had when it had spent 1/50 of ``none``'s
  total traffic;
* for ``auto``, the test accuracy after its 2R rounds.

Nothing here is tuned per workload: ``auto`` is the default configuration, whose settings
were chosen on the digits CNN's validation split only (``--select`` reruns that choice).
Writes ``runs.json`` (every run with its curve), ``summary.csv``, ``suite.md`` (the tables)
and ``curves_<workload>.png`` (validation accuracy vs cumulative traffic, every seed).
Each finished run is appended to ``rows.jsonl``; the same command after an interruption
runs only the cells not there yet. ``--from-json`` re-summarizes and re-plots a
``runs.json`` without running anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedslim.bench import plots
from fedslim.bench.runner import simulate_subprocess
from fedslim.bench.targets import (
    Curve,
    accuracy_within,
    bytes_to_target_ratio,
    first_reaching,
    target_of,
)

EQUAL_BYTES = 50.0  # "accuracy at equal bytes": after 1/EQUAL_BYTES of none's total traffic


@dataclass(frozen=True)
class Workload:
    """A model, its data and the rounds plain FedAvg needs to converge on it."""

    name: str
    what: str
    overrides: dict[str, Any]
    rounds: int


WORKLOADS = {w.name: w for w in [
    Workload("digits_cnn", "conv net, 151k params, 8x8 digits", {"model": "digits_cnn"}, 30),
    Workload("quickstart_cnn", "Flower's quickstart Net, 62k params, digits as 3x32x32",
             {"model": "quickstart_cnn", "dataset": "digits32"}, 30),
    Workload("digits_mlp", "MLP, 19k params, 8x8 digits", {"model": "digits_mlp"}, 30),
    Workload("seq_cnn", "1-D conv net, 33k params, motif-order sequences (1x96)",
             {"model": "seq_cnn", "dataset": "motifs", "synthetic-samples": 2000}, 45),
    Workload("digits_wide", "wide conv net, 1.13M params, 8x8 digits",
             {"model": "digits_wide"}, 20),
]}

STRATEGIES: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "fedadam": {"strategy": "fedadam"},
    "fedprox": {"strategy": "fedprox"},
}

BASELINE = "none"
AUTO = "auto"
SETTINGS: dict[str, dict[str, Any]] = {
    BASELINE: {"uplink": "none"},
    AUTO: {},  # the defaults: uplink=auto, downlink=auto
    "budget x150 (README, digits CNN)": {"uplink": "budget:x150|q:4|ans|pass:0",
                                         "downlink": "topk:0.05|q:4|ans"},
    "budget x50 (README, small models)": {"uplink": "budget:x50|q:4|ans|pass:0",
                                          "downlink": "topk:0.05|q:4|ans"},
}
EXTENDED = {AUTO: 2}  # settings run for this many times the workload's rounds
ONLY_UNDER = {"budget x50 (README, small models)": {"fedavg"}}  # references: fewer strategies


@dataclass
class Cell:
    """One federation of the suite."""

    workload: str
    strategy: str
    setting: str
    seed: int
    result: dict[str, Any] = field(default_factory=dict)

    def overrides(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**WORKLOADS[self.workload].overrides, **STRATEGIES[self.strategy],
                **SETTINGS[self.setting], **(extra or {}), "seed": self.seed}


def run_cell(cell: Cell, num_clients: int, extra: list[str], rounds: int | None = None
             ) -> dict[str, Any]:
    """Run one federation (``rounds``: instead of the workload's)."""
    base = rounds or WORKLOADS[cell.workload].rounds
    return {"workload": cell.workload, "strategy": cell.strategy, "setting": cell.setting,
            "seed": cell.seed, **federation(cell.overrides(), base,
                                            EXTENDED.get(cell.setting, 1), num_clients, extra)}


def federation(overrides: dict[str, Any], rounds: int, extend: int, num_clients: int,
               extra: list[str]) -> dict[str, Any]:
    """One real federation of ``rounds * extend`` rounds: its figures at round ``rounds``
    and after all of them, and its per-round curve."""
    res, wall = simulate_subprocess(overrides, num_clients, rounds * extend, extra)
    final = res.final
    if final is None or final.comm is None:
        raise RuntimeError(f"{overrides} ended without final figures")
    curve = [{"round": r.round, "val_accuracy": r.central.val.accuracy,
              "test_accuracy": r.central.test.accuracy,
              "total_bytes": r.comm_cumulative.total_bytes}
             for r in res.rounds if r.central is not None and r.comm_cumulative is not None]
    at = curve[min(rounds, len(curve)) - 1]
    return {"val_accuracy": at["val_accuracy"], "test_accuracy": at["test_accuracy"],
            "total_bytes": at["total_bytes"], "final_test_accuracy": final.test_accuracy,
            "uplink_ratio": final.comm.uplink_ratio,
            "rejected_replies": final.comm.rejected_replies,
            "rounds": final.rounds_completed, "wall_seconds": wall, "curve": curve}


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (workload, strategy, setting): means and per-seed figures against ``none``."""
    base = {(r["workload"], r["strategy"], r["seed"]): r for r in rows
            if r["setting"] == BASELINE}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["strategy"], r["setting"]), []).append(r)
    out = []
    for (wl, strategy, setting), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        s: dict[str, Any] = {"workload": wl, "strategy": strategy, "setting": setting,
                             "seeds": [r["seed"] for r in rs]}
        refused = [r["error"] for r in rs if "error" in r]
        if refused:  # e.g. a byte budget the model's replies cannot fit
            out.append({**s, "error": refused[0]})
            continue
        s["val"], s["val_sd"] = _stats([r["val_accuracy"] for r in rs])
        s["test"], s["test_sd"] = _stats([r["test_accuracy"] for r in rs])
        s["total_mb"] = statistics.mean(r["total_bytes"] for r in rs) / 1e6
        s["rounds"] = max(r["rounds"] for r in rs)
        s["test_after_all_rounds"] = statistics.mean(r["final_test_accuracy"] for r in rs)
        pairs = [(r, base[(wl, strategy, r["seed"])]) for r in rs
                 if (wl, strategy, r["seed"]) in base]
        if pairs:
            s.update(_against(pairs))
        out.append(s)
    return out


def _against(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """The figures of runs against their seed's ``none`` run."""
    diffs = [100 * (r["test_accuracy"] - b["test_accuracy"]) for r, b in pairs]
    ratios = [b["total_bytes"] / r["total_bytes"] for r, b in pairs]
    to_target, rounds, at_budget = [], [], []
    for r, b in pairs:
        mine, theirs = Curve.from_rows(r["curve"]), Curve.from_rows(b["curve"])
        to_target.append(bytes_to_target_ratio(mine, theirs))
        hit = first_reaching(mine, target_of(theirs))
        rounds.append(hit.round if hit else None)
        within = accuracy_within(mine, b["total_bytes"] / EQUAL_BYTES)
        at_budget.append(within[2] if within else None)
    reached = [x for x in to_target if x is not None]
    budget_acc = [x for x in at_budget if x is not None]
    return {"test_minus_none_pp": statistics.mean(diffs), "test_minus_none_per_seed": diffs,
            "total_ratio": statistics.mean(ratios), "total_ratio_per_seed": ratios,
            "bytes_to_target_ratio": statistics.mean(reached) if reached else None,
            "bytes_to_target_per_seed": to_target, "rounds_to_target_per_seed": rounds,
            "reached": f"{len(reached)}/{len(pairs)}",
            "test_at_equal_bytes": statistics.mean(budget_acc) if budget_acc else None,
            "test_at_equal_bytes_per_seed": at_budget}


def _fmt(x: float | None, spec: str) -> str:
    return "never" if x is None else format(x, spec)


def markdown(summary: list[dict[str, Any]], seeds: list[int]) -> str:
    """The suite's tables, one per strategy (what README and docs/results show)."""
    lines = [f"Seeds {', '.join(map(str, seeds))}; 10 clients, Dirichlet 0.5; *total x* and "
             f"*test* at the workload's round count R (`none` converged), ratios per seed "
             f"against `none` of the same seed and strategy. *to target*: bytes to first "
             f"reach 99% of `none`'s final val accuracy, as a reduction vs `none`'s (reached "
             f"by n of the seeds; `auto` ran 2R rounds). *at 1/{EQUAL_BYTES:g} bytes*: test "
             f"accuracy when the run had spent 1/{EQUAL_BYTES:g} of `none`'s total traffic. "
             f"*after 2R*: `auto`'s test accuracy after all its rounds.", ""]
    for strategy in dict.fromkeys(s["strategy"] for s in summary):
        lines += [f"**{strategy}**", "",
                  "| workload | setting | total x | test (sd) | vs none pp (per seed) | "
                  "to target x (reached) | at 1/50 bytes | after 2R |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in summary:
            if s["strategy"] != strategy:
                continue
            if "error" in s:
                reason = s["error"].replace("|", "\\|")
                lines.append(f"| {s['workload']} | {s['setting']} | refused before start: "
                             f"{reason} | | | | | |")
                continue
            per_seed = ", ".join(f"{d:+.2f}" for d in s.get("test_minus_none_per_seed", []))
            lines.append(
                f"| {s['workload']} | {s['setting']} | {_fmt(s.get('total_ratio'), '.1f')} | "
                f"{s['test']:.4f} ({s['test_sd']:.4f}) | "
                f"{s.get('test_minus_none_pp', 0.0):+.2f} ({per_seed}) | "
                f"{_fmt(s.get('bytes_to_target_ratio'), '.1f')} ({s.get('reached', '-')}) | "
                f"{_fmt(s.get('test_at_equal_bytes'), '.4f')} | "
                + (f"{s['test_after_all_rounds']:.4f} |" if s["setting"] in EXTENDED
                   else "- |"))
        lines.append("")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    workloads = "; ".join(f"{w.name} ({w.what}, {w.rounds} rounds)" for w in WORKLOADS.values())
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=f"workloads: {workloads}")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES),
                   choices=list(STRATEGIES))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--num-clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=None,
                   help="every workload's round count R (default: its own, where plain "
                   "FedAvg has converged)")
    p.add_argument("--jobs", type=int, default=1,
                   help="federations run at once (accuracy and bytes do not depend on it; "
                   "wall times do)")
    p.add_argument("-c", "--run-config", action="append", default=[],
                   help="key=value applied to every run")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-summarize and re-plot this runs.json instead of running")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_suite"))
    return p


def _run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every cell, each row appended to ``rows.jsonl`` as it finishes; cells already there
    (an interrupted run of the same command) are not run again."""
    settings = [BASELINE, *(s for s in args.settings if s != BASELINE)]
    cells = [Cell(w, st, se, seed) for seed in args.seeds for w in args.workloads
             for st in args.strategies for se in settings
             if st in ONLY_UNDER.get(se, {st})]
    journal = args.out / "rows.jsonl"
    done = {}
    if journal.exists():
        for line in journal.read_text().splitlines():
            row = json.loads(line)
            done[(row["workload"], row["strategy"], row["setting"], row["seed"])] = row
    lock = threading.Lock()

    def one(cell: Cell) -> dict[str, Any]:
        key = (cell.workload, cell.strategy, cell.setting, cell.seed)
        if key in done:
            return done[key]
        try:
            row = run_cell(cell, args.num_clients, args.run_config, args.rounds)
        except RuntimeError as exc:  # the run was refused (e.g. a budget below the envelope)
            reason = [ln for ln in str(exc).splitlines() if ln.startswith("error:")]
            if not reason:
                raise
            row = {"workload": cell.workload, "strategy": cell.strategy,
                   "setting": cell.setting, "seed": cell.seed,
                   "error": reason[-1][len("error:"):].strip()}
        with lock, open(journal, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{cell.workload} {cell.strategy} {cell.setting!r} seed {cell.seed}: " + (
            f"refused: {row['error']}" if "error" in row else
            f"test {row['test_accuracy']:.4f}, {row['total_bytes'] / 1e6:.2f} MB (round "
            f"{args.rounds or WORKLOADS[cell.workload].rounds})"), flush=True)
        return row

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        return list(pool.map(one, cells))


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = (json.loads(args.from_json.read_text())["rows"] if args.from_json
            else _run_all(args))
    summary = summarize(rows)
    seeds = sorted({r["seed"] for r in rows})
    (args.out / "runs.json").write_text(json.dumps({"rows": rows, "summary": summary,
                                                    "run_config": args.run_config}, indent=1))
    with open(args.out / "summary.csv", "w", newline="") as fh:
        keys = sorted({k for s in summary for k in s})
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(summary)
    table = markdown(summary, seeds)
    (args.out / "suite.md").write_text(table + "\n")
    for wl in dict.fromkeys(r["workload"] for r in rows):
        plots.suite_curves([r for r in rows if r["workload"] == wl and "error" not in r],
                           args.out / f"curves_{wl}.png",
                           f"{wl}: {WORKLOADS[wl].what}" if wl in WORKLOADS else wl)
    sys.stdout.write(table + "\n")
    print(f"wrote {args.out}/runs.json, summary.csv, suite.md, curves_<workload>.png")


if __name__ == "__main__":
    main()
