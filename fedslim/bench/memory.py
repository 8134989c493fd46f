"""Server memory vs number of clients: streaming aggregation against decoding all replies.

    python -m fedslim.bench.memory --clients 10 100 --model wide32 --dataset synthetic32

For each number of clients (all of them train every round) and each mode -- before
(every reply decoded up front, node contexts holding model copies), streaming
aggregation (``stream-aggregation=true``: one decoded update at a time), and streaming
plus ``spill-client-state=true`` (nodes keep their model-sized state in files, not in
the contexts that Flower's simulation engine holds in the server process) -- runs
``fedslim simulate`` for ``--rounds`` rounds and reads from its results.json the server
process's peak RSS (``getrusage`` high-water mark of the process that runs the ServerApp)
and the time split of the round. Prints the growth of the server's peak from the fewest
to the most clients, in units of the model's fp32 size, and the codec share of the
clients' time: (uplink encode + downlink decode) / (train + encode + decode), each as the
nodes measure and report it in their uplink headers -- over the whole run and per round
(a node's first rounds also create its state files, later rounds rewrite them in place).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedslim.report import load_results
from fedslim.task.models import InputShape, build_model, count_params

SHAPES: dict[str, InputShape] = {"synthetic32": (3, 32, 32), "cifar10": (3, 32, 32),
                                 "digits": (1, 8, 8), "synthetic": (1, 8, 8)}


MODES = {  # name: (stream-aggregation, spill-client-state)
    "before (decode all, contexts in memory)": (False, False),
    "streaming aggregation": (True, False),
    "streaming + spilled client state": (True, True),
}


def run(args: argparse.Namespace, clients: int, mode: str, out: Path) -> dict[str, Any]:
    stream, spill = MODES[mode]
    cmd = [sys.executable, "-m", "fedslim.cli", "simulate", "--num-clients", str(clients),
           "--rounds", str(args.rounds), "--output-dir", str(out)]
    for kv in (f"model={args.model}", f"dataset={args.dataset}",
               f"synthetic-samples={args.samples}",
               f"uplink={args.uplink}", f"stream-aggregation={str(stream).lower()}",
               f"spill-client-state={str(spill).lower()}",
               "fraction-evaluate=0", "client-eval-fraction=0", "partitioning=iid",
               f"min-train-nodes={min(2, clients)}", f"seed={args.seed}", "progress=false"):
        cmd += ["-c", kv]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                        text=True).returncode
    wall = time.perf_counter() - t0
    res = load_results(out)
    rounds = [r for r in res.rounds if r.resources]
    last = rounds[-1].resources if rounds else None
    train = sum(r.resources.client_train_seconds for r in rounds if r.resources)
    encode = sum(r.resources.client_encode_seconds for r in rounds if r.resources)
    node_decode = sum(r.resources.client_decode_seconds for r in rounds if r.resources)
    decode = sum(r.resources.server_decode_seconds for r in rounds if r.resources)
    return {"clients": clients, "mode": mode, "rc": rc, "wall_seconds": wall,
            "server_peak_rss_mb": max((r.resources.server_peak_rss_mb for r in rounds
                                       if r.resources), default=None),
            "client_peak_rss_mb": last.client_peak_rss_mb if last else None,
            "client_train_seconds": train, "client_encode_seconds": encode,
            "client_decode_seconds": node_decode,
            "server_decode_seconds": decode,
            "server_aggregate_seconds": sum(r.resources.server_aggregate_seconds
                                            for r in rounds if r.resources),
            "test_accuracy": res.final.test_accuracy if res.final else None,
            "codec_share_per_round": [_share(r.resources) for r in rounds
                                      if r.resources]}


def _share(res: Any) -> float:
    """(encode + decode) / (train + encode + decode) of one round's nodes."""
    codec = res.client_encode_seconds + res.client_decode_seconds
    total = res.client_train_seconds + codec
    return codec / total if total > 0 else 0.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    p.add_argument("--model", default="wide32")
    p.add_argument("--dataset", default="synthetic32")
    p.add_argument("--samples", type=int, default=6000,
                   help="synthetic examples in all (the same for every number of clients, "
                   "so only the number of clients changes)")
    p.add_argument("--uplink", default="topk:0.01|q:4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--modes", type=int, nargs="+", default=list(range(len(MODES))),
                   help="which modes to run, by position: " + "; ".join(
                       f"{i}: {m}" for i, m in enumerate(MODES)))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    modes = [m for i, m in enumerate(MODES) if i in args.modes]
    shape = SHAPES.get(args.dataset, (3, 32, 32))
    model_mb = count_params(build_model(args.model, shape, 10)) * 4 / 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in args.clients:
            for i, mode in enumerate(modes):
                row = run(args, clients, mode, Path(tmp) / f"{clients}-{i}")
                rows.append(row)
                print(f"  {clients:4d} clients, {mode:40s}: server peak "
                      f"{row['server_peak_rss_mb']:7.0f} MB, wall {row['wall_seconds']:6.1f} s,"
                      f" rc {row['rc']}", flush=True)
    print(f"{args.model} ({model_mb:.1f} MB fp32) on {args.dataset}, uplink {args.uplink}, "
          f"{args.samples} examples in all, {args.rounds} rounds, every client every round, "
          f"seed {args.seed}:")
    lo, hi = min(args.clients), max(args.clients)
    for mode in modes:
        a = next(r for r in rows if r["clients"] == lo and r["mode"] == mode)
        b = next(r for r in rows if r["clients"] == hi and r["mode"] == mode)
        grow = b["server_peak_rss_mb"] - a["server_peak_rss_mb"]
        print(f"  {mode:40s}: server peak {lo} clients {a['server_peak_rss_mb']:.0f} MB -> "
              f"{hi} clients {b['server_peak_rss_mb']:.0f} MB: +{grow:.0f} MB = "
              f"{grow / model_mb:.2f} x the model")
    for r in rows:
        codec = r["client_encode_seconds"] + r["client_decode_seconds"]
        client = r["client_train_seconds"] + codec
        print(f"  {r['clients']:4d} clients, {r['mode']:40s}: codec share of client time "
              f"{100 * codec / client:.1f}% (encode {r['client_encode_seconds']:.1f} s + "
              f"decode {r['client_decode_seconds']:.1f} s / train "
              f"{r['client_train_seconds']:.1f} s)"
              f"; server decode {r['server_decode_seconds']:.1f} s, aggregate "
              f"{r['server_aggregate_seconds']:.1f} s")
        print("        per round: " + ", ".join(
            f"{i}: {100 * x:.1f}%" for i, x in enumerate(r["codec_share_per_round"], 1)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model_mb": model_mb, "args": {
            k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
