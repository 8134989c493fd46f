"""One real Flower simulation that runs ``Compressed`` around several stock strategies.

    python -m tests.e2e.stacks_federation OUT.json SIZES.jsonl

The ClientApp is the quickstart-style app of :mod:`tests.apps` plus fedslim's
``compression_mod`` (and, outermost, a mod that logs the serialized size of every message
as the client sees it, to SIZES.jsonl). The ServerApp runs each stack for two rounds on the
same nodes (one Ray start-up for all) and writes what each stack's collector reported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedslim.client import compression_mod
from fedslim.flower_io import message_bytes
from fedslim.strategies import Compressed
from tests.apps import NODES, STACKS, initial_arrays, make_quickstart_app

SIZES_ENV = "FEDSLIM_TEST_SIZES"

def size_log_mod(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
    path = os.environ[SIZES_ENV]
    incoming = message_bytes(msg)
    reply = call_next(msg, context)
    with open(path, "a") as fh:
        fh.write(json.dumps({"type": msg.metadata.message_type,
                             "down": incoming, "up": message_bytes(reply)}) + "\n")
    return reply


def make_server(out: Path) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        results = {}
        for name, make in STACKS.items():
            strategy = Compressed(make(), uplink="topk:0.1|q:4", downlink="topk:0.25|q:8")
            res = strategy.start(grid, initial_arrays(), num_rounds=2,
                                 train_config=ConfigRecord({"lr": 0.1}))
            strategy.collector.close()
            results[name] = {
                "rounds": [dataclasses.asdict(r) for r in strategy.collector.history],
                "final_arrays": len(res.arrays),
            }
        out.write_text(json.dumps(results))

    return app


def main(out: str, sizes: str) -> None:
    os.environ[SIZES_ENV] = sizes
    run_simulation(server_app=make_server(Path(out)),
                   client_app=make_quickstart_app([size_log_mod, compression_mod]),
                   num_supernodes=NODES,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
