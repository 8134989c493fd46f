"""Communication-savings benchmark: bytes on the wire vs accuracy, against plain FedAvg.

Each setting is a real federation (``fedslim simulate`` in a subprocess, Flower's
simulation engine); bytes are what Flower serialized, read back from ``results.json``:
train replies (uplink), train instructions (downlink), evaluate instructions and replies
(evaluate traffic), and their sum (total, every message both directions).

    python -m fedslim.bench.comm --num-clients 10 --rounds 20 --seeds 42 1 2 --out DIR

Writes ``runs.csv`` / ``runs.json`` (one row per setting and seed, plus the summary),
``frontier_total.png`` and ``frontier_uplink.png`` (reduction vs final test accuracy, mean
and sd over the seeds), ``curves.png`` (accuracy vs cumulative total MB, first seed only),
and prints a table. Ratios are per seed against the ``none`` run of the same seed, then
averaged. **Selection is on the server's validation split**: among settings whose uplink
reduction reaches ``--min-ratio`` (resp. whose total reduction reaches
``--min-total-ratio``), the one with the best mean final validation accuracy is marked
selected; test accuracy is only reported. ``--from-json`` re-summarizes and re-plots an
earlier ``runs.json`` without running anything.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedslim.bench import plots
from fedslim.bench.runner import simulate_subprocess
from fedslim.config import parse_run_config
from fedslim.config_fields import parse_cli_overrides

_MOMENTUM = {"server-opt": "avgm", "server-momentum": 0.5}
# Explicit, so a setting means the same under partial participation, where the default
# (`error-feedback=auto`) turns client error feedback off.
_EF = {"error-feedback": True}
_UP = {"uplink": "topk:0.01|q:4", **_MOMENTUM, **_EF}
_ONE_WAY = {"downlink": "none"}

# Fixed in advance (not tuned on test). The first block compresses the uplink only (the
# first release's table); the second compresses both directions (downlink = the server's
# step through its own codec and error feedback; `downlink=auto`, the default, is the one
# the total selection picks).
BASELINE = "none (FedAvg)"
SETTINGS: dict[str, dict[str, Any]] = {
    "none (FedAvg)": {"uplink": "none"},
    "q:8": {"uplink": "q:8", **_ONE_WAY},
    "topk 1% + q4 (EF)": {"uplink": "topk:0.01|q:4", **_EF, **_ONE_WAY},
    "topk 1% + q4, warm-up 4": {"uplink": "topk:0.01|q:4", "warmup-rounds": 4, **_EF,
                                **_ONE_WAY},
    "topk 1% + q4, server momentum": {**_UP, **_ONE_WAY},
    "topk 1% + q4, no EF": {"uplink": "topk:0.01|q:4", "error-feedback": False,
                            **_ONE_WAY},
    # Error feedback under partial participation (issue 16): a rarely sampled client's
    # residual is stale; drop it after N rounds away, drop EF, or keep memory on the server.
    "topk 1% + q4, EF reset after 10": {"uplink": "topk:0.01|q:4", "ef-reset-after": 10,
                                        **_EF, **_ONE_WAY},
    "topk 1% + q4, no EF, server momentum": {**_UP, "error-feedback": False, **_ONE_WAY},
    "topk 1% + q4, no EF, server momentum 0.9": {**_UP, "error-feedback": False,
                                                 "server-momentum": 0.9, **_ONE_WAY},
    "topk 1% + q4, EF reset after 10, server momentum": {**_UP, "ef-reset-after": 10,
                                                          **_ONE_WAY},
    "topk 0.5% + q4": {"uplink": "topk:0.005|q:4", **_ONE_WAY},
    "topk 1% + q2": {"uplink": "topk:0.01|q:2", **_ONE_WAY},
    "topk 2% + q4": {"uplink": "topk:0.02|q:4", **_ONE_WAY},
    "both ways: down topk 10% + q8": {**_UP, "downlink": "topk:0.1|q:8"},
    "both ways: down topk 10% + q4": {**_UP, "downlink": "topk:0.1|q:4"},
    "both ways: down topk 5% + q4": {**_UP, "downlink": "topk:0.05|q:4"},
    "both ways: down topk 2% + q4": {**_UP, "downlink": "topk:0.02|q:4"},
    "both ways: down topk 1% + q4": {**_UP, "downlink": "topk:0.01|q:4"},
    # byte budgets (whole serialized reply, envelope and metrics included) + entropy-coded
    # values: the settings of issue 15, uplink only so they compare with the first block
    "budget x250 + q4 + ans, momentum": {"uplink": "budget:x250|q:4|ans", **_MOMENTUM,
                                         **_ONE_WAY},
    "budget x250 + q4 + ans, pass:0, momentum": {"uplink": "budget:x250|q:4|ans|pass:0",
                                                 **_MOMENTUM, **_ONE_WAY},
    "budget x250 + q2 + ans, pass:0, momentum": {"uplink": "budget:x250|q:2|ans|pass:0",
                                                 **_MOMENTUM, **_ONE_WAY},
    "budget x150 + q4 + ans, momentum": {"uplink": "budget:x150|q:4|ans", **_MOMENTUM,
                                         **_ONE_WAY},
    # other model sizes (-c model=...): the same recipe at other budgets
    **{f"budget x{r} + q4 + ans, momentum": {"uplink": f"budget:x{r}|q:4|ans", **_MOMENTUM,
                                             **_ONE_WAY} for r in (20, 30, 50, 100, 500)},
    **{f"budget x{r} + q4 + ans, pass:0, momentum": {
        "uplink": f"budget:x{r}|q:4|ans|pass:0", **_MOMENTUM, **_ONE_WAY}
       for r in (10, 15, 20, 30, 40, 50, 60, 75, 100, 500)},
    # partial participation (issue 16): the x100 recipe with fewer bits or other server steps
    "budget x100 + q2 + ans, pass:0, momentum": {"uplink": "budget:x100|q:2|ans|pass:0",
                                                 **_MOMENTUM, **_ONE_WAY},
    "budget x100 + q4 + ans, pass:0, momentum 0.7": {
        "uplink": "budget:x100|q:4|ans|pass:0", **_MOMENTUM, "server-momentum": 0.7,
        **_ONE_WAY},
    "budget x100 + q4 + ans, pass:0, momentum, server lr 1.5": {
        "uplink": "budget:x100|q:4|ans|pass:0", **_MOMENTUM, "server-lr": 1.5, **_ONE_WAY},
    # both directions with the issue-15 uplink and entropy-coded downlink steps
    "both ways: budget x250 + q4 + ans, pass:0; down topk 5% + q4 + ans": {
        "uplink": "budget:x250|q:4|ans|pass:0", **_MOMENTUM, "downlink": "topk:0.05|q:4|ans"},
    "both ways: budget x150 + q4 + ans, pass:0; down topk 5% + q4 + ans": {
        "uplink": "budget:x150|q:4|ans|pass:0", **_MOMENTUM, "downlink": "topk:0.05|q:4|ans"},
    # both directions at low participation: the x100 uplink with downlink steps, alone (a
    # node picked past the 32-step chain gets the full model) and with keyframes (the
    # model's drift from round 0, compressed, instead of the full model)
    "x100 q2 both ways: down topk 5% + q4 + ans": {
        "uplink": "budget:x100|q:2|ans|pass:0", **_MOMENTUM, "downlink": "topk:0.05|q:4|ans"},
    **{f"x100 q2 both ways: down topk 5% + q4 + ans, keyframes every {k} ({name})": {
        "uplink": "budget:x100|q:2|ans|pass:0", **_MOMENTUM, "downlink": "topk:0.05|q:4|ans",
        "keyframe-every": k, "keyframe": spec}
       for k in (4, 8, 16) for name, spec in (("q8 + ans", "q:8|ans"), ("q4 + ans", "q:4|ans"))},
    # PowerSGD factors instead of top-k (on the same frontier)
    **{f"lowrank {r} + q8 + ans, momentum": {"uplink": f"lowrank:{r}|q:8|ans", **_MOMENTUM,
                                             **_ONE_WAY} for r in (1, 4)},
}


def run_one(name: str, overrides: dict[str, Any], num_clients: int, rounds: int, seed: int,
            extra: list[str]) -> dict[str, Any]:
    res, _ = simulate_subprocess({**overrides, "seed": seed}, num_clients, rounds, extra)
    final, tot = res.final, res.final.comm if res.final else None
    if final is None or tot is None:
        raise RuntimeError(f"setting {name!r} (seed {seed}) ended without final comm figures")
    curve = [{"uplink_bytes": r.comm_cumulative.uplink_bytes,
              "total_bytes": r.comm_cumulative.total_bytes,
              "test_accuracy": r.central.test.accuracy}
             for r in res.rounds if r.comm_cumulative is not None and r.central is not None]
    return {
        "setting": name, "seed": seed, **{f"cfg:{k}": v for k, v in overrides.items()},
        "final_test_accuracy": final.test_accuracy,
        "final_val_accuracy": final.val_accuracy,
        "uplink_bytes": tot.uplink_bytes, "downlink_bytes": tot.downlink_bytes,
        "evaluate_bytes": tot.downlink_eval_bytes + tot.uplink_eval_bytes,
        "total_bytes": tot.total_bytes, "uplink_none_bytes": tot.uplink_none_bytes,
        "uplink_ratio": tot.uplink_ratio, "rejected_replies": tot.rejected_replies,
        "encode_seconds": tot.encode_seconds, "decode_seconds": tot.decode_seconds,
        "wall_seconds": res.wall_seconds, "curve": curve,
        # per participating node and round: every message it sent or received, both ways
        "node_rounds": (n := sum(r.replies + r.failures for r in res.rounds)),
        "bytes_per_node_round": tot.total_bytes / max(n, 1),
        "full_model_messages": sum(r.comm.full_model_messages for r in res.rounds if r.comm),
        "delta_messages": sum(r.comm.delta_messages for r in res.rounds if r.comm),
        "current_messages": sum(r.comm.current_messages for r in res.rounds if r.comm),
        "key_messages": sum(r.comm.key_messages for r in res.rounds if r.comm),
        "init_messages": sum(r.comm.init_messages for r in res.rounds if r.comm),
    }


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict[str, Any]], min_ratio: float, min_total_ratio: float
              ) -> list[dict[str, Any]]:
    """Per setting: means (and sd) over seeds; ratios per seed against that seed's none."""
    none = {r["seed"]: r for r in rows if r["setting"].startswith("none")}
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(r)
    out = []
    for name, rs in by.items():
        base = [none[r["seed"]] for r in rs if r["seed"] in none]
        test, test_sd = _mean_sd([r["final_test_accuracy"] for r in rs])
        s: dict[str, Any] = {
            "setting": name, "seeds": [r["seed"] for r in rs],
            "uplink_ratio": statistics.mean(r["uplink_ratio"] for r in rs),
            "uplink_mb": statistics.mean(r["uplink_bytes"] for r in rs) / 1e6,
            "downlink_mb": statistics.mean(r["downlink_bytes"] for r in rs) / 1e6,
            "evaluate_mb": statistics.mean(r["evaluate_bytes"] for r in rs) / 1e6,
            "total_mb": statistics.mean(r["total_bytes"] for r in rs) / 1e6,
            "kb_per_node_round": statistics.mean(r["bytes_per_node_round"] for r in rs) / 1e3,
            "val": statistics.mean(r["final_val_accuracy"] for r in rs),
            "test": test, "test_sd": test_sd,
        }
        if len(base) == len(rs):
            s["total_ratio"] = statistics.mean(b["total_bytes"] / r["total_bytes"]
                                               for r, b in zip(rs, base, strict=True))
            per_seed = [100 * (r["final_test_accuracy"] - b["final_test_accuracy"])
                        for r, b in zip(rs, base, strict=True)]
            s["test_minus_none_pp"] = statistics.mean(per_seed)
            s["test_minus_none_pp_per_seed"] = per_seed
        out.append(s)
    for key, ratio, floor in (("selected_uplink", "uplink_ratio", min_ratio),
                              ("selected_total", "total_ratio", min_total_ratio)):
        eligible = [s for s in out if s.get(ratio, 0.0) >= floor]
        best = max(eligible, key=lambda s: s["val"]) if eligible else None
        for s in out:
            s[key] = s is best
    return out


def _settings_help() -> str:
    rows = [f"  {name!r}: " + (" ".join(f"{k}={v}" for k, v in ov.items()) or "defaults")
            for name, ov in SETTINGS.items()]
    return "settings (name: run-config overrides; every other key at its default):\n" + \
        "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=_settings_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-clients", type=int, default=10, help="default: %(default)s")
    p.add_argument("--rounds", type=int, default=20, help="default: %(default)s")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="default: %(default)s")
    p.add_argument("--settings", nargs="*", default=None,
                   help="names of the settings to run (default: all, listed below)")
    p.add_argument("--min-ratio", type=float, default=100.0,
                   help="uplink selection: best val accuracy among settings with at least "
                   "this uplink reduction (default: %(default)s)")
    p.add_argument("--min-total-ratio", type=float, default=100.0,
                   help="total selection: the same on total traffic (default: %(default)s)")
    p.add_argument("-c", "--run-config", action="append", default=[],
                   help="key=value applied to every setting")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-summarize and re-plot this runs.json instead of running")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_comm"),
                   help="default: %(default)s")
    return p


def _run_all(args: argparse.Namespace, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    with Progress() as progress:
        task = progress.add_task("federations", total=len(names) * len(args.seeds))
        for seed in args.seeds:
            for name in names:
                progress.update(task, description=f"{name} (seed {seed})")
                rows.append(run_one(name, SETTINGS[name], args.num_clients, args.rounds,
                                    seed, args.run_config))
                progress.advance(task)
    return rows


def workload(run_config: list[str]) -> str:
    """What the plots' titles say was run: model, data, partitioning, participation (the
    ``-c`` overrides applied to every setting, parsed as the CLI parses them, on top of
    the run config's defaults)."""
    cfg = parse_run_config(parse_cli_overrides(run_config))
    parts = [f"{cfg.train.model} on {cfg.data.dataset}", str(cfg.data.partitioning)
             + (f" {cfg.data.dirichlet_alpha:g}" if cfg.data.partitioning == "dirichlet"
                else "")]
    if cfg.fed.fraction_train < 1.0:
        parts.append(f"fraction-train {cfg.fed.fraction_train:g}")
    return ", ".join(parts)


def _write(rows: list[dict[str, Any]], summary: list[dict[str, Any]], out: Path,
           run_config: list[str]) -> None:
    what = workload(run_config)
    (out / "runs.json").write_text(json.dumps({"rows": rows, "summary": summary,
                                               "run_config": run_config}, indent=2))
    with open(out / "runs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[k for k in rows[0] if k != "curve"]
                           + sorted({k for r in rows for k in r} - set(rows[0])),
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    seeds = sorted({r["seed"] for r in rows}, key=[r["seed"] for r in rows].index)
    plots.frontier(summary, out / "frontier_total.png", "total_ratio",
                   "total traffic reduction vs none (x): every message, both directions",
                   f"total bytes vs accuracy ({what}; seeds {seeds})",
                   "selected_total")
    plots.frontier(summary, out / "frontier_uplink.png", "uplink_ratio",
                   "uplink reduction vs none (x, serialized bytes)",
                   f"uplink bytes vs accuracy ({what}; seeds {seeds})",
                   "selected_uplink")
    plots.curves(rows, seeds[0], out / "curves.png", "total_bytes",
                 "cumulative total traffic (MB, all messages, both directions)",
                 f"accuracy vs cumulative traffic ({what}), seed {seeds[0]} only")


def _table(summary: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for col in ("setting", "total x", "uplink x", "up MB", "down MB", "eval MB", "total MB",
                "kB/node/rnd", "val", "test (sd)", "vs none pp", "sel"):
        table.add_column(col)
    for s in summary:
        sel = ("U" if s["selected_uplink"] else "") + ("T" if s["selected_total"] else "")
        table.add_row(s["setting"], f"{s.get('total_ratio', float('nan')):.1f}",
                      f"{s['uplink_ratio']:.1f}", f"{s['uplink_mb']:.3f}",
                      f"{s['downlink_mb']:.3f}", f"{s['evaluate_mb']:.3f}",
                      f"{s['total_mb']:.3f}", f"{s['kb_per_node_round']:.1f}", f"{s['val']:.4f}",
                      f"{s['test']:.4f} ({s['test_sd']:.4f})",
                      f"{s.get('test_minus_none_pp', float('nan')):+.2f}", sel)
    return table


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    names = args.settings or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        print(f"error: unknown setting(s) {unknown}; known: {list(SETTINGS)}", file=sys.stderr)
        raise SystemExit(2)
    if BASELINE not in names:  # every ratio and pp difference is against it, seed by seed
        names.insert(0, BASELINE)
    args.out.mkdir(parents=True, exist_ok=True)
    run_config = args.run_config
    if args.from_json:
        stored = json.loads(args.from_json.read_text())
        rows = stored["rows"]
        # the -c overrides the runs were made with (runs.json of older versions: as given)
        run_config = stored.get("run_config", run_config)
    else:
        rows = _run_all(args, names)
    summary = summarize(rows, args.min_ratio, args.min_total_ratio)
    _write(rows, summary, args.out, run_config)
    seeds = sorted({r["seed"] for r in rows})
    Console(width=160).print(_table(summary, (
        f"{args.num_clients} clients, {args.rounds} rounds, seeds {seeds}; selection on val: "
        f"U = best with uplink x >= {args.min_ratio:g}, T = best with total x >= "
        f"{args.min_total_ratio:g}")))
    print(f"wrote {args.out}/runs.csv, runs.json, frontier_total.png, frontier_uplink.png, "
          "curves.png")


if __name__ == "__main__":
    main()
