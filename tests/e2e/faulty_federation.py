"""A real simulated federation in which some clients misbehave (run as a subprocess).

    python -m tests.e2e.faulty_federation OUTDIR

Partition 0 truncates its payload, 1 flips bytes in it, 2 crashes mid-round, 3 sends plain
float arrays holding NaN instead of the payload the server asked for; 4 and 5 are honest. A
Flower client *mod* does the damage after the real ClientApp (and its compression_mod) has
produced its reply, so everything else is the production path.
"""

from __future__ import annotations

import sys

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.simulation import run_simulation

from fedslim.client.app import make_client_app
from fedslim.flower_io import unfold_reply
from fedslim.protocol import ARRAYS as ARRAYS_KEY
from fedslim.protocol import PAYLOAD as PAYLOAD_KEY
from fedslim.protocol import PAYLOAD_ARRAY
from fedslim.server.app import make_server_app


def faulty_mod(msg: Message, context: Context, call_next) -> Message:  # type: ignore[no-untyped-def]
    pid = int(context.node_config["partition-id"])
    if msg.metadata.message_type != "train" or pid > 3:
        return call_next(msg, context)
    if pid == 2:
        raise RuntimeError("client 2 died mid-round (injected)")
    reply = call_next(msg, context)
    unfold_reply(reply.content, "test")  # compact form (small payloads) -> usual records
    arr = reply.content[PAYLOAD_KEY][PAYLOAD_ARRAY]
    data = bytes(arr.data)
    if pid == 0:
        data = data[: len(data) // 2]
    elif pid == 1:
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 8]) + data[mid + 8:]
    if pid == 3:
        del reply.content[PAYLOAD_KEY]
        reply.content[ARRAYS_KEY] = ArrayRecord(
            {"features.0.weight": Array(np.full((32, 1, 3, 3), np.nan, dtype=np.float32))})
        return reply
    reply.content[PAYLOAD_KEY] = ArrayRecord({PAYLOAD_ARRAY: Array(
        dtype="uint8", shape=(len(data),), stype=arr.stype, data=data)})
    return reply


def main(outdir: str) -> None:
    overrides = {"num-server-rounds": 2, "output-dir": outdir, "progress": False,
                 "uplink": "topk:0.05|q:4", "min-train-nodes": 2, "min-available-nodes": 6,
                 "fraction-evaluate": 0.0,
                 # what is tested here is decoding; with two honest replies a round, the
                 # trust defence would also reject one whose update points away from the
                 # server's reference (early rounds), which is tested elsewhere
                 "defence-trust-ratio": 0.0}
    run_simulation(server_app=make_server_app(overrides),
                   client_app=make_client_app(overrides, mods=[faulty_mod]),
                   num_supernodes=6,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})


if __name__ == "__main__":
    main(sys.argv[1])
