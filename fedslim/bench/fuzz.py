"""Fuzz the server's decoder with hostile payloads: typed errors only, bounded cost.

    python -m fedslim.bench.fuzz --inputs 1000000

Builds valid payloads of a real update (the digits CNN: 151k parameters) under several
pipelines, then mutates them: bit flips, byte runs, truncations, insertions, splices of two
payloads and random varints -- each with the checksum recomputed half the time, so the
mutation reaches the parser instead of stopping at the CRC. Every input is decoded exactly
as the server does (``max_elements`` = the model's size, the expected pipeline and the
model's names and shapes). Prints the number of inputs, how many decoded, how many raised
the typed ``DecodeError``, how many raised anything else (must be 0), how many took over
``--slow`` seconds (must be 0), the slowest input and the peak RSS; exits 1 on any
untyped error or slow input. Deterministic for a given ``--seed``.
"""

from __future__ import annotations

import argparse
import resource
import struct
import sys
import time
import zlib

import numpy as np
import torch

from fedslim.compression import decode_update, encode_update, parse_spec
from fedslim.compression.wire import HEADER
from fedslim.errors import DecodeError
from fedslim.task.models import build_model

SPECS = ["topk:0.01|q:4", "topk:0.01|q:4|zstd", "q:8", "topk:0.05|q:2,block=64|golomb",
         "topk:0.1|sign", "fp16", "topk:0.01|bitmap|pass:0"]


def _fix_crc(data: bytearray) -> None:
    """Recompute the header's body length and CRC so a mutation reaches the parser."""
    if len(data) < HEADER.size:
        return
    struct.pack_into("<Q", data, 8, len(data) - HEADER.size)
    crc = zlib.crc32(bytes(data[HEADER.size:]), zlib.crc32(bytes(data[:16])))
    struct.pack_into("<I", data, 16, crc)


def mutate(seeds: list[bytes], rng: np.random.Generator) -> bytes:
    data = bytearray(seeds[int(rng.integers(len(seeds)))])
    op = int(rng.integers(6))
    n = len(data)
    if op == 0:  # flip 1-8 bits anywhere
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(n))
            data[i] ^= 1 << int(rng.integers(8))
    elif op == 1:  # overwrite a run with random bytes (often a length or varint)
        i = int(rng.integers(n))
        run = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        data[i:i + len(run)] = run
    elif op == 2:  # truncate
        del data[int(rng.integers(n)):]
    elif op == 3:  # insert bytes
        i = int(rng.integers(n))
        data[i:i] = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif op == 4:  # splice two payloads
        other = seeds[int(rng.integers(len(seeds)))]
        data = data[:int(rng.integers(n))] + other[int(rng.integers(len(other))):]
    else:  # a huge varint (0xff... continuation bytes) somewhere in the body
        i = int(rng.integers(HEADER.size, max(HEADER.size + 1, n)))
        data[i:i] = b"\xff" * int(rng.integers(1, 12)) + b"\x7f"
    if rng.random() < 0.5:
        _fix_crc(data)
    return bytes(data)


def worst_case(update: dict[str, torch.Tensor], limit: int,
               schema: dict[str, tuple[int, ...]]) -> str:
    """The most expensive small payloads we know: dense, zstd-packed zeros (a few hundred
    bytes that inflate to the whole model) and a dense 8-bit update; time and memory of
    decoding each as the server does."""
    zeros = {k: torch.zeros_like(v) for k, v in update.items()}
    lines = []
    for name, spec, tensors in (("dense q:8 of zeros, zstd", "q:8|zstd", zeros),
                                ("dense q:8 update", "q:8", update),
                                ("dense fp16 update", "fp16", update)):
        payload = encode_update(tensors, spec)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            decode_update(payload, max_elements=limit, expected_spec=spec, schema=schema)
            times.append(time.perf_counter() - t0)
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        lines.append(f"  {name:26s} {len(payload):7d} bytes: decode {1e3 * max(times):.2f} ms "
                     f"(max of 20), peak RSS +{grew:.1f} MB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow", type=float, default=1.0, help="seconds that count as a hang")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    state = build_model("digits_cnn").state_dict()
    update = {k: torch.randn_like(v) * 0.01 for k, v in state.items()}
    schema = {k: tuple(v.shape) for k, v in update.items()}
    limit = sum(v.numel() for v in update.values())
    # Every pipeline, self-describing, schema-bound (compact records, names from the
    # receiver's schema: fedslim's downlink) and schema-bound + spec-implied (its uplink).
    expected = {encode_update(update, s, schema_bound=bound, spec_implied=implied): parse_spec(s)
                for s in SPECS for bound, implied in ((False, False), (True, False),
                                                      (True, True))}
    seeds = list(expected)
    rng = np.random.default_rng(args.seed)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counts = {"decoded": 0, "typed": 0, "other": 0, "slow": 0}
    worst, worst_len = 0.0, 0
    other_examples: list[str] = []
    t_start = time.perf_counter()
    for i in range(args.inputs):
        data = mutate(seeds, rng)
        spec = expected.get(seeds[i % len(seeds)])
        t0 = time.perf_counter()
        try:
            decode_update(data, max_elements=limit, expected_spec=spec, schema=schema)
            counts["decoded"] += 1
        except DecodeError:
            counts["typed"] += 1
        except Exception as exc:  # must never happen
            counts["other"] += 1
            if len(other_examples) < 5:
                other_examples.append(f"input {i}: {type(exc).__name__}: {exc}")
        dt = time.perf_counter() - t0
        if dt > worst:
            worst, worst_len = dt, len(data)
        counts["slow"] += dt > args.slow
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    total = time.perf_counter() - t_start
    print(f"inputs {args.inputs}  decoded {counts['decoded']}  typed errors (DecodeError) "
          f"{counts['typed']}  other exceptions {counts['other']}  hangs (> {args.slow:g} s) "
          f"{counts['slow']}")
    print(f"slowest input {worst * 1e3:.2f} ms ({worst_len} bytes); mean "
          f"{total / max(args.inputs, 1) * 1e6:.1f} us; peak RSS {rss_mb:.0f} MB, "
          f"{rss_mb - base_rss:.1f} MB above the process after set-up (model "
          f"{limit * 4 / 1e6:.2f} MB fp32); {total:.0f} s")
    for line in other_examples:
        print("  " + line)
    print("costliest valid payloads (the server's limits: model size, expected pipeline):")
    print(worst_case(update, limit, schema))
    return 1 if counts["other"] or counts["slow"] else 0


if __name__ == "__main__":
    sys.exit(main())
