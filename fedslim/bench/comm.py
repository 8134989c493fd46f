"""Communication-savings benchmark: bytes on the wire vs accuracy, against plain FedAvg.

Each setting is a real federation (``fedslim simulate`` in a subprocess, Flower's
simulation engine); bytes are what Flower serialized, read back from ``results.json``.

    python -m fedslim.bench.comm --num-clients 10 --rounds 20 --out docs/results/comm

Writes ``runs.csv`` / ``runs.json`` (one row per setting and seed), ``frontier.png``
(uplink reduction vs final accuracy) and ``curves.png`` (accuracy vs cumulative uplink MB),
and prints a table. **Selection is on the server's validation split**: among settings
whose uplink reduction reaches ``--min-ratio``, the one with the best mean final
validation accuracy is marked ``selected``; test accuracy is only reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedslim.bench.runner import simulate_subprocess

# Fixed in advance (not tuned on test): the issue's target setting, its DGC-style variants,
# neighbours in density/bits, and ablations.
SETTINGS: dict[str, dict[str, Any]] = {
    "none (FedAvg)": {"uplink": "none"},
    "q:8": {"uplink": "q:8"},
    "topk 1% + q4 (EF)": {"uplink": "topk:0.01|q:4"},
    "topk 1% + q4, warm-up 4": {"uplink": "topk:0.01|q:4", "warmup-rounds": 4},
    "topk 1% + q4, server momentum": {"uplink": "topk:0.01|q:4", "server-opt": "avgm",
                                      "server-momentum": 0.5},
    "topk 1% + q4, no EF": {"uplink": "topk:0.01|q:4", "error-feedback": False},
    "topk 0.5% + q4": {"uplink": "topk:0.005|q:4"},
    "topk 1% + q2": {"uplink": "topk:0.01|q:2"},
    "topk 2% + q4": {"uplink": "topk:0.02|q:4"},
}


def run_one(name: str, overrides: dict[str, Any], num_clients: int, rounds: int, seed: int,
            extra: list[str]) -> dict[str, Any]:
    res, _ = simulate_subprocess({**overrides, "seed": seed}, num_clients, rounds, extra)
    final, tot = res.final, res.final.comm if res.final else None
    if final is None or tot is None:
        raise RuntimeError(f"setting {name!r} (seed {seed}) ended without final comm figures")
    curve = [(r.comm_cumulative.uplink_bytes, r.central.test.accuracy) for r in res.rounds
             if r.comm_cumulative is not None and r.central is not None]
    return {
        "setting": name, "seed": seed, **{f"cfg:{k}": v for k, v in overrides.items()},
        "final_test_accuracy": final.test_accuracy,
        "final_val_accuracy": final.val_accuracy,
        "uplink_bytes": tot.uplink_bytes,
        "downlink_bytes": tot.downlink_bytes + tot.downlink_eval_bytes,
        "uplink_none_bytes": tot.uplink_none_bytes, "total_bytes": tot.total_bytes,
        "uplink_ratio": tot.uplink_ratio, "encode_seconds": tot.encode_seconds,
        "decode_seconds": tot.decode_seconds, "wall_seconds": res.wall_seconds,
        "curve": curve,
    }


def summarize(rows: list[dict[str, Any]], min_ratio: float) -> list[dict[str, Any]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["setting"], []).append(r)
    out = []
    for name, rs in by.items():
        n = len(rs)
        out.append({"setting": name, "seeds": n,
                    "uplink_ratio": sum(r["uplink_ratio"] for r in rs) / n,
                    "uplink_mb": sum(r["uplink_bytes"] for r in rs) / n / 1e6,
                    "val": sum(r["final_val_accuracy"] for r in rs) / n,
                    "test": sum(r["final_test_accuracy"] for r in rs) / n})
    base = next((s for s in out if s["setting"].startswith("none")), None)
    eligible = [s for s in out if s["uplink_ratio"] >= min_ratio]
    best = max(eligible, key=lambda s: s["val"]) if eligible else None
    for s in out:
        s["test_minus_none_pp"] = 100 * (s["test"] - base["test"]) if base else None
        s["selected"] = s is best
    return out


def plot(rows: list[dict[str, Any]], summary: list[dict[str, Any]], out: Path,
         seeds: list[int]) -> None:
    """frontier.png (mean over ``seeds``) and curves.png (one seed, named in the title).

    Points carry numbers and a legend below the axes, so labels never overlap or get cut.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "os^vD<>ph*"
    fig, ax = plt.subplots(figsize=(8, 6.5))
    for i, s in enumerate(summary):
        ax.scatter(s["uplink_ratio"], 100 * s["test"], s=90 if s["selected"] else 45,
                   marker="*" if s["selected"] else markers[i % len(markers)],
                   label=f"{i + 1}. {s['setting']}" + ("  (selected on val)" if s["selected"]
                                                        else ""), zorder=3)
        ax.annotate(str(i + 1), (s["uplink_ratio"], 100 * s["test"]), fontsize=8,
                    xytext=(5, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("uplink reduction vs none (x, serialized bytes)")
    ax.set_ylabel("final central test accuracy (%)")
    ax.set_title(f"uplink bytes vs accuracy (digits, Dirichlet 0.5; mean of seeds {seeds})",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2,
              frameon=False)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 6.5))
    for r in rows:
        if r["seed"] != seeds[0]:
            continue
        xs = [c[0] / 1e6 for c in r["curve"]]
        ax.plot(xs, [100 * c[1] for c in r["curve"]], label=r["setting"], lw=1.2)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink (MB, all clients)")
    ax.set_ylabel("central test accuracy (%)")
    ax.set_title(f"accuracy vs cumulative uplink, seed {seeds[0]} only", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2,
              frameon=False)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _settings_help() -> str:
    rows = [f"  {name!r}: " + (" ".join(f"{k}={v}" for k, v in ov.items()) or "defaults")
            for name, ov in SETTINGS.items()]
    return "settings (name: run-config overrides; every other key at its default):\n" + \
        "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=_settings_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-clients", type=int, default=10, help="default: %(default)s")
    p.add_argument("--rounds", type=int, default=20, help="default: %(default)s")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="default: %(default)s")
    p.add_argument("--settings", nargs="*", default=None,
                   help="names of the settings to run (default: all, listed below)")
    p.add_argument("--min-ratio", type=float, default=100.0,
                   help="selection: best val accuracy among settings with at least this "
                   "uplink reduction (default: %(default)s)")
    p.add_argument("-c", "--run-config", action="append", default=[],
                   help="key=value applied to every setting")
    p.add_argument("--out", type=Path, default=Path("outputs/bench_comm"),
                   help="default: %(default)s")
    args = p.parse_args(argv)
    names = args.settings or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        print(f"error: unknown setting(s) {unknown}; known: {list(SETTINGS)}", file=sys.stderr)
        raise SystemExit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with Progress() as progress:
        task = progress.add_task("federations", total=len(names) * len(args.seeds))
        for seed in args.seeds:
            for name in names:
                progress.update(task, description=f"{name} (seed {seed})")
                rows.append(run_one(name, SETTINGS[name], args.num_clients, args.rounds,
                                    seed, args.run_config))
                progress.advance(task)
    summary = summarize(rows, args.min_ratio)
    (args.out / "runs.json").write_text(json.dumps({"rows": rows, "summary": summary},
                                                   indent=2))
    with open(args.out / "runs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[k for k in rows[0] if k != "curve"]
                           + sorted({k for r in rows for k in r} - set(rows[0])),
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot(rows, summary, args.out, args.seeds)
    table = Table(title=f"{args.num_clients} clients, {args.rounds} rounds, seeds "
                        f"{args.seeds} (selection on val, ratio >= {args.min_ratio})")
    for col in ("setting", "uplink x", "uplink MB", "val acc", "test acc", "test - none (pp)",
                "selected"):
        table.add_column(col)
    for s in summary:
        table.add_row(s["setting"], f"{s['uplink_ratio']:.1f}", f"{s['uplink_mb']:.3f}",
                      f"{s['val']:.4f}", f"{s['test']:.4f}",
                      f"{s['test_minus_none_pp']:+.2f}", "*" if s["selected"] else "")
    Console(width=120).print(table)
    print(f"wrote {args.out}/runs.csv, runs.json, frontier.png, curves.png")


if __name__ == "__main__":
    main()
