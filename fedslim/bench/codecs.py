"""Codec benchmark: ``python -m fedslim.bench.codecs [--json PATH] [--repeats N]``.

Prints, per pipeline, the encoded size of (a) a 10M-parameter float32 update with heavy-tailed
values and (b) a real update of the digits CNN (one local epoch of SGD on scikit-learn's
digits): bytes actually sent, ratio vs fp32, bits per kept value, the information bound
``log2 C(n,k) + k*bits + scales`` and our size over it (``/bound``), the same with the values
at their codes' empirical entropy (``/H bnd``), the quantized values sections over that
entropy (``val/H``: what ``ans`` is judged by), and encode / decode throughput in MB/s
of fp32 input (MB = 1e6 bytes) on one CPU core (``torch.set_num_threads(1)``), plus CUDA rows
when a GPU is present. Times are the median of ``--repeats`` runs after one warm-up run.
This is a script, not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from fedslim.compression import decode_update, encode_update, parse_spec
from fedslim.compression.bound import payload_stats

PIPELINES = [
    ("fp32", "none"),
    ("fp16", "fp16"),
    ("q8", "q:8"),
    ("q8+zstd", "q:8|zstd"),
    ("topk1%+q4 (target)", "topk:0.01|q:4"),
    ("topk1%+q4 sampled", "topk:0.01,mode=sampled|q:4"),
    ("topk1%+q4 block256", "topk:0.01|q:4,block=256"),
    ("topk1%+q4+zstd", "topk:0.01|q:4|zstd"),
    ("topk1%+q2", "topk:0.01|q:2"),
    ("topk0.1%+q4", "topk:0.001|q:4"),
    ("topk1%+sign", "topk:0.01|sign"),
    ("q8+ans", "q:8|ans"),
    ("topk1%+q4+ans", "topk:0.01|q:4|ans"),
    ("topk0.1%+q4+ans", "topk:0.001|q:4|ans"),
    ("topk1%+q2+ans", "topk:0.01|q:2|ans"),
]
# The same pipelines as fedslim's uplink sends them: schema-bound (a 16-byte schema digest
# instead of tensor names and shapes) and spec-implied (no spec string, no quantizer
# block); decoded with the receiver's schema and the spec it asked for.
SCHEMA_BOUND = [
    ("topk1%+q4 [uplink]", "topk:0.01|q:4"),
    ("topk0.1%+q4 [uplink]", "topk:0.001|q:4"),
    ("topk1%+q4+ans [uplink]", "topk:0.01|q:4|ans"),
    ("topk0.1%+q4+ans [uplink]", "topk:0.001|q:4|ans"),
]
TARGET_SPEC = "topk:0.01|q:4"
TARGET_OVER_BOUND = 1.10
TARGET_CPU_MBPS = 200.0


@dataclass(frozen=True)
class Row:
    case: str
    pipeline: str
    spec: str
    device: str
    numel: int
    kept: int
    payload_bytes: int
    ratio_vs_fp32: float
    bits_per_kept: float
    bound_bytes: float
    over_bound: float
    over_entropy_bound: float
    values_over_entropy: float
    encode_mbps: float
    decode_mbps: float
    both_mbps: float
    schema_bound: bool = False


def heavy_tailed_update(numel: int = 10_000_000, seed: int = 0) -> dict[str, torch.Tensor]:
    """A transformer-ish layer list (~10M params): Student-t(3) values, per-layer and per-row
    scales (log-normal), so magnitudes are heavy-tailed and clustered like real updates."""
    rng = np.random.default_rng(seed)
    shapes = {"embed.weight": (5000, 256), "block1.weight": (2048, 2048), "block1.bias": (2048,),
              "block2.weight": (2048, 2048), "block2.bias": (2048,), "norm.weight": (2048,),
              "head.weight": (163, 2048)}
    scale = numel / sum(int(np.prod(s)) for s in shapes.values())
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 2 and scale != 1.0:
            shape = (max(1, round(shape[0] * scale)), shape[1])
        layer = 10.0 ** rng.uniform(-4, -2)
        rows = rng.lognormal(0.0, 0.5, (shape[0],) + (1,) * (len(shape) - 1))
        values = rng.standard_t(3, shape).astype(np.float32) * (layer * rows).astype(np.float32)
        out[name] = torch.from_numpy(values)
    return out


def digits_cnn_update(seed: int = 0) -> dict[str, torch.Tensor]:
    """After-minus-before weights of one local epoch (SGD lr 0.05, batch 32) on digits."""
    torch.manual_seed(seed)
    model, x, y = _digits_model_and_data()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    order = torch.randperm(len(y))
    for start in range(0, len(y), 32):
        batch = order[start:start + 32]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    return {k: (v.detach() - before[k]).float() for k, v in model.state_dict().items()
            if v.dtype.is_floating_point}


def _digits_model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    try:  # the project's registry and loader, when present
        from fedslim.task.datasets import load_digits_pool
        from fedslim.task.models import build_model

        pool = load_digits_pool()
        return (build_model("digits_cnn"), torch.from_numpy(pool.x),
                torch.from_numpy(pool.y.astype(np.int64)))
    except ImportError:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.from_numpy((bunch.images / 16.0).astype(np.float32)[:, None])
        model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveMaxPool2d(4), nn.Flatten(), nn.Linear(1024, 128),
                              nn.ReLU(), nn.Linear(128, 10))
        return model, x, torch.from_numpy(bunch.target.astype(np.int64))


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(case: str, label: str, spec: str, update: dict[str, torch.Tensor], device: str,
            repeats: int, schema_bound: bool = False) -> Row:
    on_device = {k: v.to(device) for k, v in update.items()}
    schema = {k: tuple(v.shape) for k, v in update.items()} if schema_bound else None
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    parsed = parse_spec(spec)
    implied = (str(parsed), getattr(parsed.values, "block", 0)) if schema_bound else (None, 0)
    payload = encode_update(on_device, spec, generator=gen, schema_bound=schema_bound,
                            spec_implied=schema_bound)
    t_enc = _median_seconds(lambda: encode_update(on_device, spec, generator=gen,
                                                  schema_bound=schema_bound,
                                                  spec_implied=schema_bound), repeats, sync)
    t_dec = _median_seconds(lambda: decode_update(payload, device=device, schema=schema,
                                                  expected_spec=spec), repeats, sync)
    stats = payload_stats(payload, schema=schema, spec=implied[0], block=implied[1])
    mb = 4 * stats.numel / 1e6
    return Row(case, label, spec, device, stats.numel, stats.kept, stats.payload_bytes,
               4 * stats.numel / stats.payload_bytes, stats.bits_per_kept,
               stats.bound_bits / 8, stats.over_bound, stats.over_entropy_bound,
               stats.values_over_entropy, mb / t_enc, mb / t_dec,
               mb / (t_enc + t_dec), schema_bound)


def format_table(rows: list[Row]) -> str:
    head = (f"{'case':<12} {'pipeline':<24} {'dev':<4} {'bytes':>10} {'x fp32':>8} "
            f"{'bits/kept':>9} {'bound B':>10} {'/bound':>7} {'/H bnd':>7} {'val/H':>6} "
            f"{'enc MB/s':>9} {'dec MB/s':>9} {'e+d MB/s':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.case:<12} {r.pipeline:<24} {r.device[:4]:<4} {r.payload_bytes:>10d} "
                     f"{r.ratio_vs_fp32:>8.1f} {r.bits_per_kept:>9.2f} {r.bound_bytes:>10.0f} "
                     f"{r.over_bound:>7.3f} {r.over_entropy_bound:>7.3f} "
                     f"{r.values_over_entropy:>6.3f} {r.encode_mbps:>9.0f} {r.decode_mbps:>9.0f} "
                     f"{r.both_mbps:>9.0f}")
    return "\n".join(lines)


def target_report(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.spec != TARGET_SPEC or r.schema_bound:
            continue
        ok_bound = r.over_bound <= TARGET_OVER_BOUND
        line = (f"target {r.case}/{r.device}: size/bound {r.over_bound:.3f} (<= "
                f"{TARGET_OVER_BOUND}: {'PASS' if ok_bound else 'MISS'})")
        if r.device == "cpu":
            ok = r.both_mbps >= TARGET_CPU_MBPS
            line += (f"; encode+decode {r.both_mbps:.0f} MB/s on one core (>= "
                     f"{TARGET_CPU_MBPS:.0f}: {'PASS' if ok else 'MISS'})")
        out.append(line)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--numel", type=int, default=10_000_000,
                        help="size of the synthetic update (a)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = {"a:10M-heavy": heavy_tailed_update(args.numel), "b:digits-cnn": digits_cnn_update()}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [measure(case, label, spec, update, device, args.repeats, bound)
            for case, update in cases.items()
            for device in devices
            for bound, pipelines in ((False, PIPELINES), (True, SCHEMA_BOUND))
            for label, spec in pipelines]
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, numpy {np.__version__}, {cpu}, "
          f"torch threads {torch.get_num_threads()}; MB = 1e6 bytes of fp32 input; "
          f"median of {args.repeats}")
    print(format_table(rows))
    for line in target_report(rows):
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"torch": torch.__version__, "rows": [asdict(r) for r in rows]}, fh,
                      indent=2)


if __name__ == "__main__":
    main()
