"""Entropy-coded values vs their empirical entropy and the floor no coder can beat:
``python -m fedslim.bench.entropy [--seeds 0 1 2] [--json PATH]``.

For each update (the digits CNN after one local epoch and the 10M heavy-tailed update of
``fedslim.bench.codecs``, one per seed) and each ``ans`` pipeline, it prints every quantized
record: its codes (``n``), distinct codes, whether it went entropy-coded (``ans``) or packed,
its values section in bytes, the codes' empirical entropy ``n H / 8`` (``H B``), the ratio
(``/H``), what the normalised maximum-likelihood code -- the minimax-optimal coder that learns
the histogram from the data -- would write for it (``NML/H``), and ``floor``: a ratio that
every coder reaches on some record of ``n`` codes of this width
(:func:`fedslim.compression.bound.entropy_floor`). Then one summary line per update kind and
pipeline, mean and (min..max) over the seeds, for the entropy-coded records together and for
all quantized records (the codec bench's ``val/H``), and per code width the largest record
size at which the floor rules out a 1.05x promise. Sizes only: no timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from fedslim.bench.codecs import digits_cnn_update, heavy_tailed_update
from fedslim.compression import encode_update
from fedslim.compression.bound import (
    EntropyRatios,
    RecordEntropy,
    entropy_floor,
    record_entropy,
)

SPECS = ["topk:0.01|q:4|ans", "topk:0.001|q:4|ans", "topk:0.01|q:2|ans"]
TARGET = 1.05


@dataclass(frozen=True)
class Summary(EntropyRatios):
    """Records of one payload taken together (sums of bytes, then the ratios)."""

    values_bytes: int
    entropy_bytes: float
    regret_bytes: float
    floor_excess_bytes: float  # sum over records of (floor - 1) * n * bits / 8
    max_entropy_bytes: float  # n * bits / 8: no record of these sizes has more

    @property
    def over_entropy(self) -> float:
        return super().over_entropy if self.max_entropy_bytes else float("nan")

    @property
    def nml_over_entropy(self) -> float:
        return super().nml_over_entropy if self.max_entropy_bytes else float("nan")

    @property
    def floor(self) -> float:
        """``nan`` for no records (nothing to judge), like the two ratios."""
        return (1.0 + self.floor_excess_bytes / self.max_entropy_bytes
                if self.max_entropy_bytes else float("nan"))


def summarise(records: Sequence[RecordEntropy]) -> Summary:
    return Summary(sum(r.values_bytes for r in records), sum(r.entropy_bytes for r in records),
                   sum(r.regret_bytes for r in records),
                   sum((r.floor - 1) * r.count * r.bits / 8 for r in records),
                   sum(r.count * r.bits / 8 for r in records))


def largest_ruled_out(bits: int, target: float = TARGET) -> int:
    """The largest record size (codes) at which ``entropy_floor(bits, n) > target``: at that
    size no coder can promise ``target`` on every record. (The floor falls with ``n`` past
    a few codes: a doubling bracket, then a scan down from it.)"""
    hi = 1
    while entropy_floor(bits, hi) > target or hi < 8:
        hi *= 2
    n = hi
    while n > 0 and entropy_floor(bits, n) <= target:
        n -= 1
    return n


def _spread(values: list[float]) -> str:
    return (f"{statistics.fmean(values):.3f} ({min(values):.3f}..{max(values):.3f})"
            if values else "-")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--numel", type=int, default=10_000_000,
                        help="size of the heavy-tailed update")
    parser.add_argument("--json", metavar="PATH", help="also write every record as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    makers: dict[str, Callable[[int], dict[str, torch.Tensor]]] = {
        "digits-cnn": digits_cnn_update,
        "10M-heavy": lambda seed: heavy_tailed_update(args.numel, seed)}
    head = (f"{'case':<10} {'seed':>4} {'pipeline':<20} {'record':<16} {'n':>8} {'dist':>4} "
            f"{'form':<6} {'bytes':>8} {'H B':>10} {'/H':>7} {'NML/H':>7} {'floor':>7}")
    print(head)
    print("-" * len(head))
    rows: list[dict[str, object]] = []
    totals: dict[tuple[str, str], dict[str, list[float]]] = {}
    for case, make in makers.items():
        for seed in args.seeds:
            update = make(seed)
            for spec in SPECS:
                gen = torch.Generator().manual_seed(seed)
                records = record_entropy(encode_update(update, spec, generator=gen))
                for r in records:
                    print(f"{case:<10} {seed:>4} {spec:<20} {r.name[:16]:<16} {r.count:>8} "
                          f"{r.distinct:>4} {'ans' if r.entropy_coded else 'packed':<6} "
                          f"{r.values_bytes:>8} {r.entropy_bytes:>10.1f} "
                          f"{r.over_entropy:>7.3f} {r.nml_over_entropy:>7.3f} {r.floor:>7.3f}")
                    rows.append({"case": case, "seed": seed, "spec": spec, **asdict(r)})
                coded = summarise([r for r in records if r.entropy_coded])
                every = summarise(records)
                acc = totals.setdefault((case, spec), {k: [] for k in (
                    "coded", "coded_nml", "coded_floor", "all", "all_nml")})
                acc["coded"].append(coded.over_entropy)
                acc["coded_nml"].append(coded.nml_over_entropy)
                acc["coded_floor"].append(coded.floor)
                acc["all"].append(every.over_entropy)
                acc["all_nml"].append(every.nml_over_entropy)
    print(f"\nmean (min..max) over seeds {' '.join(map(str, args.seeds))}")
    summary_head = (f"{'case':<10} {'pipeline':<20} {'ans records /H':>22} "
                    f"{'their NML/H':>22} {'their floor':>22} {'all quantized /H':>22}")
    print(summary_head)
    print("-" * len(summary_head))
    for (case, spec), acc in totals.items():
        print(f"{case:<10} {spec:<20} {_spread(acc['coded']):>22} "
              f"{_spread(acc['coded_nml']):>22} {_spread(acc['coded_floor']):>22} "
              f"{_spread(acc['all']):>22}")
    thresholds = {bits: largest_ruled_out(bits) for bits in (1, 2, 4, 8)}
    print(f"\nlargest record at which no coder can promise <= {TARGET}x the empirical "
          "entropy on every record (the floor is above it): "
          + ", ".join(f"{bits}-bit {n} codes" for bits, n in thresholds.items()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"records": rows, "thresholds": thresholds,
                       "summary": [{"case": c, "spec": s, **acc}
                                   for (c, s), acc in totals.items()]}, fh, indent=2)


if __name__ == "__main__":
    main()
