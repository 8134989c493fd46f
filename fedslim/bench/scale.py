"""Scale benchmark: many clients, partial participation, side by side with stock Flower.

    python -m fedslim.bench.scale --num-clients 1000 --fraction 0.1 --rounds 20

Runs, one after the other on the same workload (synthetic 8x8 data, IID partitions, the
digits CNN, 2 local epochs, no federated evaluation): a plain Flower app with Flower's
FedAvg (``fedslim.bench.stock_app``, no fedslim code), fedslim with ``uplink=none``, and
fedslim with ``--uplink`` (downlink ``auto``). Each is a subprocess of Flower's simulation
engine; the harness samples the summed memory (proportional set size, so shared pages
count once) of every process it started (found by a tag in their environment) every
0.5 s. Prints wall time (and its ratio to stock), the peak of that sum, total bytes both
directions, final test accuracy, and fedslim's codec share of the clients' time ((uplink
encode + downlink decode seconds) / train seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from fedslim.deploy.processes import tagged_processes
from fedslim.report import load_results

BENCH_TAG = "FEDSLIM_BENCH_TAG"


def _pss_mb(pids: list[int]) -> float:
    """Summed proportional set size: shared pages (torch's libraries, Ray's object store)
    are split between the processes that map them, so the sum is the real footprint."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


def measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Run ``cmd``; (wall seconds, peak summed PSS MB of it and its descendants, rc)."""
    # Our own variable: fedslim's CLI sets FEDSLIM_DEPLOY_TAG for what it starts itself.
    tag = f"fedslim-scale-{os.getpid()}-{time.time_ns()}"
    peak, done = [0.0], threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**env, BENCH_TAG: tag}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)

    def sample() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], _pss_mb([proc.pid, *tagged_processes(tag, BENCH_TAG)]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    done.set()
    wall = time.perf_counter() - t0
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    return wall, peak[0], proc.returncode


def run_fedslim(args: argparse.Namespace, uplink: str, tmp: Path) -> dict[str, Any]:
    out = tmp / f"fedslim-{uplink.replace('|', '_').replace(':', '')}"
    cmd = [sys.executable, "-m", "fedslim.cli", "simulate", "--num-clients",
           str(args.num_clients), "--rounds", str(args.rounds), "--output-dir", str(out)]
    extra = [] if uplink == "none" else args.compressed_config
    for kv in (*extra, f"uplink={uplink}", f"fraction-train={args.fraction}",
               "fraction-evaluate=0",
               "dataset=synthetic", f"synthetic-samples={args.samples}", "partitioning=iid",
               "val-fraction=0", "proxy-fraction=0", "client-eval-fraction=0",
               f"seed={args.seed}", "progress=false"):
        cmd += ["-c", kv]
    wall, rss, rc = measured(cmd, dict(os.environ))
    res = load_results(out)
    final = res.final
    train = sum(r.resources.client_train_seconds for r in res.rounds if r.resources)
    encode = sum(r.resources.client_encode_seconds + r.resources.client_decode_seconds
                 for r in res.rounds if r.resources)  # the codec: uplink + downlink
    name = " ".join([f"uplink={uplink}", *extra])
    return {"run": f"fedslim {name}", "wall_seconds": wall, "peak_rss_mb": rss,
            "rc": rc, "test_accuracy": final.test_accuracy if final else None,
            "total_bytes": final.comm.total_bytes if final and final.comm else None,
            "codec_share": encode / train if train else None,
            "server_peak_rss_mb": max((r.resources.server_peak_rss_mb for r in res.rounds
                                       if r.resources), default=None)}


def run_stock(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out = tmp / "stock.json"
    env = {**os.environ, "STOCK_SEED": str(args.seed), "STOCK_SAMPLES": str(args.samples),
           "STOCK_ROUNDS": str(args.rounds), "STOCK_FRACTION": str(args.fraction),
           "STOCK_CLIENTS": str(args.num_clients)}
    wall, rss, rc = measured([sys.executable, "-m", "fedslim.bench.stock_app", str(out)], env)
    res = json.loads(out.read_text()) if out.exists() else {}
    return {"run": "stock Flower FedAvg (no fedslim code)", "wall_seconds": wall,
            "peak_rss_mb": rss, "rc": rc, "test_accuracy": res.get("test_accuracy"),
            "total_bytes": res.get("total_bytes"), "codec_share": None,
            "server_peak_rss_mb": None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-clients", type=int, default=1000)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--samples", type=int, default=40000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--uplink", default="topk:0.01|q:4")
    p.add_argument("--compressed-config", nargs="*",
                   default=["server-opt=avgm", "server-momentum=0.5"],
                   help="run-config for the compressed run only (default: server momentum, "
                   "the best setting measured under partial participation, docs/scaling.md)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        rows = [run_stock(args, tmp), run_fedslim(args, "none", tmp),
                run_fedslim(args, args.uplink, tmp)]
    stock = rows[0]["wall_seconds"]
    print(f"{args.num_clients} clients, {args.fraction:g} per round, {args.rounds} rounds, "
          f"{args.samples} synthetic samples, seed {args.seed}:")
    for r in rows:
        mb = f"{r['total_bytes'] / 1e6:.1f} MB" if r["total_bytes"] else "-"
        share = f"{100 * r['codec_share']:.2f}%" if r["codec_share"] is not None else "-"
        acc = f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "-"
        print(f"  {r['run']:70s} wall {r['wall_seconds']:6.1f} s (x{r['wall_seconds'] / stock:.2f}"
              f" stock)  peak memory {r['peak_rss_mb']:6.0f} MB  bytes {mb:>9s}  test acc {acc}"
              f"  codec share {share}  rc {r['rc']}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
