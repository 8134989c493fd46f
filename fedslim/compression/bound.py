"""The information bound a payload is measured against.

For each tensor with ``n`` elements of which ``k`` are sent at ``b`` bits each, plus ``m``
float32 scales, no code can do better than ``log2 C(n, k) + k*b + 32*m`` bits without
modelling the values themselves: ``log2 C(n, k)`` is the cost of saying *which* k of n were
kept. Reporting payload bits over this bound shows how much the position code, headers and
names waste -- the benchmark target for ``topk:0.01|q:4`` is at most 1.10x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedslim.compression.quantize import ValueCodec, n_scales
from fedslim.compression.wire import read_payload

_VALUE_BITS = {ValueCodec.F32: 32, ValueCodec.F16: 16, ValueCodec.BF16: 16}


def log2_binomial(n: int, k: int) -> float:
    """``log2 C(n, k)`` via lgamma (exact enough for any n, no big integers)."""
    if k <= 0 or k >= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


@dataclass(frozen=True)
class PayloadStats:
    """Sizes of one payload next to its information bound.

    Attributes
    ----------
    payload_bytes : int
        ``len(payload)``: everything that is sent, headers and names included.
    numel, kept : int
        Elements in the update, and values actually sent.
    bound_bits : float
        Sum over tensors of ``log2 C(n, k) + k * value_bits + 32 * scales``.
    """

    payload_bytes: int
    numel: int
    kept: int
    bound_bits: float

    @property
    def over_bound(self) -> float:
        return 8 * self.payload_bytes / self.bound_bits if self.bound_bits else float("inf")

    @property
    def bits_per_kept(self) -> float:
        return 8 * self.payload_bytes / self.kept if self.kept else float("inf")


def payload_stats(payload: bytes, max_elements: int = 1 << 31) -> PayloadStats:
    """Measure a payload produced by ``encode_update`` (it is parsed and validated)."""
    _, records = read_payload(payload, max_elements)
    bound = 0.0
    for rec in records:
        bits = rec.bits if rec.value_codec is ValueCodec.QUANT else _VALUE_BITS[rec.value_codec]
        scales = n_scales(rec.count, rec.block) if rec.value_codec is ValueCodec.QUANT else 0
        bound += log2_binomial(rec.numel, rec.count) + rec.count * bits + 32 * scales
    return PayloadStats(len(payload), sum(r.numel for r in records),
                        sum(r.count for r in records), bound)
