"""Fuzz the server's decoder with hostile payloads: typed errors only, bounded cost.

    python -m fedslim.bench.fuzz --inputs 1000000
    python -m fedslim.bench.fuzz --client        # hostile downlinks, decoded as a node does

Builds valid payloads of a real update (the digits CNN: 151k parameters) under several
pipelines, then mutates them: bit flips, byte runs, truncations, insertions, splices of two
payloads and random varints -- each with the checksum recomputed half the time, so the
mutation reaches the parser instead of stopping at the CRC. Every input is decoded exactly
as the server does (``max_elements`` = the model's size, the expected pipeline and the
model's names and shapes). Prints the number of inputs, how many decoded, how many raised
the typed ``DecodeError``, how many raised anything else (must be 0), how many took over
``--slow`` seconds (must be 0), the slowest input and the peak RSS; exits 1 on any
untyped error or slow input. Deterministic for a given ``--seed``.

``--client`` decodes the way a node decodes a downlink delta: against its model's names,
shapes and size, into its reused buffers, and with *any* pipeline (a node that was not told
the server's pipeline -- ``compression_mod`` in a stock app -- cannot pin it); the
costliest-payload table then covers every pipeline family, each measured in a fresh
process: decode time (max of 20) and peak RSS above the process with its buffers in use,
as a multiple of the model's float32 size.
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


CLIENT_WORST = [  # (what, spec, zeros?): tiny payloads that decode to the whole model
    ("rank-63 factors of zeros, 1-bit, rANS", "lowrank:63|q:1|ans", True),
    ("dense 1-bit zeros, lane-coded rANS", "q:1|ans", True),
    ("dense 8-bit zeros, zstd", "q:8|zstd", True),
    ("99% kept, golomb positions, fp32", "topk:0.99|fp32|golomb", False),
    ("99% kept, bitmap, 1-bit rANS", "topk:0.99|q:1|bitmap|ans", False),
    ("dense fp32 update", "fp32", False),
]


def _client_payload(spec: str, zeros: bool) -> bytes:
    torch.manual_seed(0)
    state = build_model("digits_cnn").state_dict()
    update = {k: torch.zeros_like(v) if zeros else torch.randn_like(v) * 0.01
              for k, v in state.items()}
    return encode_update(update, spec, schema_bound=True)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak_rss() -> int:
    """Reset the process's peak RSS to its current RSS (Linux: clear_refs 5); return it
    in kB. The peak after torch's import is far above any decode's, so ``ru_maxrss``
    alone would show nothing."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kb("VmRSS")


def client_case(path: str, spec: str) -> str:
    """Decode the payload in ``path`` as a node does, in a process that has allocated
    nothing model-sized but the node's buffers (the shapes come from a meta-device model)."""
    with torch.device("meta"):
        state = build_model("digits_cnn").state_dict()
    schema = {k: tuple(v.shape) for k, v in state.items()}
    limit = sum(v.numel() for v in state.values())
    with open(path, "rb") as fh:
        payload = fh.read()
    bufs = {k: torch.full(shape, 0.5) for k, shape in schema.items()}  # the node's, in use
    # once first: code pages, allocator arenas (a one-off, not a per-downlink cost)
    decode_update(payload, max_elements=limit, expected_spec=spec, schema=schema, out=bufs)
    before = _reset_peak_rss()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        decode_update(payload, max_elements=limit, schema=schema, out=bufs)
        times.append(time.perf_counter() - t0)
    grew = (_status_kb("VmHWM") - before) * 1024
    times.sort()
    return (f"{len(payload)} {1e3 * times[len(times) // 2]:.2f} {1e3 * times[-1]:.2f} "
            f"{grew / (4 * limit):.2f} {grew / 1e6:.2f}")


def client_worst_case() -> tuple[str, bool]:
    """The costly downlinks, each in its own process; (table, all within 50 ms / 2x)."""
    import subprocess
    import tempfile

    lines, ok = [], True
    for name, spec, zeros in CLIENT_WORST:
        with tempfile.NamedTemporaryFile(suffix=".payload") as fh:
            fh.write(_client_payload(spec, zeros))
            fh.flush()
            out = subprocess.run([sys.executable, "-m", "fedslim.bench.fuzz", "--client-case",
                                  fh.name, "--spec", spec], capture_output=True, text=True,
                                 timeout=600, check=True).stdout.split()
        size, median, ms, model_x, mb = int(out[0]), *map(float, out[1:])
        ok = ok and median <= 50 and model_x <= 2  # the max shows the machine's load too
        lines.append(f"  {name:40s} {spec:26s} {size:7d} bytes: decode median {median:6.2f} "
                     f"ms, max {ms:6.2f} ms (20 runs); peak RSS +{mb:.2f} MB = "
                     f"{model_x:.2f}x the model")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow", type=float, default=1.0, help="seconds that count as a hang")
    p.add_argument("--client", action="store_true",
                   help="decode as a node decodes a downlink: any pipeline, into buffers")
    p.add_argument("--client-case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client_case is not None:
        print(client_case(args.client_case, args.spec))
        return 0
    torch.manual_seed(args.seed)
    state = build_model("digits_cnn").state_dict()
    update = {k: torch.randn_like(v) * 0.01 for k, v in state.items()}
    schema = {k: tuple(v.shape) for k, v in update.items()}
    limit = sum(v.numel() for v in update.values())
    # Every pipeline, self-describing, schema-bound (compact records, names from the
    # receiver's schema: fedslim's downlink) and schema-bound + spec-implied (its uplink).
    specs = SPECS + [s for _, s, _ in CLIENT_WORST] if args.client else SPECS
    expected = {encode_update(update, s, schema_bound=bound, spec_implied=implied): parse_spec(s)
                for s in specs for bound, implied in ((False, False), (True, False),
                                                      (True, True))
                if not (args.client and implied)}  # a node has no spec to imply one
    bufs = {k: torch.zeros_like(v) for k, v in update.items()} if args.client else None
    seeds = list(expected)
    rng = np.random.default_rng(args.seed)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counts = {"decoded": 0, "typed": 0, "other": 0, "slow": 0}
    worst, worst_len = 0.0, 0
    other_examples: list[str] = []
    t_start = time.perf_counter()
    for i in range(args.inputs):
        data = mutate(seeds, rng)
        spec = None if args.client else expected.get(seeds[i % len(seeds)])
        t0 = time.perf_counter()
        try:
            decode_update(data, max_elements=limit, expected_spec=spec, schema=schema,
                          out=bufs)
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
    if args.client:
        print("costliest valid downlinks (a node's limits: model size and shapes, any "
              "pipeline; target: median <= 50 ms, peak <= 2x the model):")
        table, bounded = client_worst_case()
        print(table)
        return 1 if counts["other"] or counts["slow"] or not bounded else 0
    print("costliest valid payloads (the server's limits: model size, expected pipeline):")
    print(worst_case(update, limit, schema))
    return 1 if counts["other"] or counts["slow"] else 0


if __name__ == "__main__":
    sys.exit(main())
