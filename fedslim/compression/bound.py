"""The information bound a payload is measured against.

For each tensor with ``n`` elements of which ``k`` are sent at ``b`` bits each, plus ``m``
float32 scales, no code can do better than ``log2 C(n, k) + k*b + 32*m`` bits without
modelling the values themselves: ``log2 C(n, k)`` is the cost of saying *which* k of n were
kept. Reporting payload bits over this bound shows how much the position code, headers and
names waste -- the benchmark target for ``topk:0.01|q:4`` is at most 1.10x.

The *entropy bound* replaces ``k*b`` by ``k * H(codes)``, the empirical entropy of the
quantized codes actually sent: the least any coder of those codes can write without a
better model than their histogram. It is what the ``ans`` stage is measured against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedslim.compression import entropy
from fedslim.compression.bitpack import unpack_codes
from fedslim.compression.positions import PositionCodec
from fedslim.compression.quantize import ValueCodec, n_scales
from fedslim.compression.wire import TensorRecord, read_payload

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
    entropy_bound_bits: float = 0.0
    values_bytes: int = 0
    values_entropy_bytes: float = 0.0

    @property
    def over_bound(self) -> float:
        return 8 * self.payload_bytes / self.bound_bits if self.bound_bits else float("inf")

    @property
    def over_entropy_bound(self) -> float:
        """Payload over the bound with quantized values at their codes' empirical entropy."""
        bits = self.entropy_bound_bits
        return 8 * self.payload_bytes / bits if bits else float("inf")

    @property
    def values_over_entropy(self) -> float:
        """Quantized values sections alone over ``count * H(codes) / 8``."""
        return (self.values_bytes / self.values_entropy_bytes if self.values_entropy_bytes
                else float("inf"))

    @property
    def bits_per_kept(self) -> float:
        return 8 * self.payload_bytes / self.kept if self.kept else float("inf")


def _codes(rec: TensorRecord) -> np.ndarray:
    if rec.entropy:
        return entropy.decode_codes(rec.values, rec.bits, rec.count, rec.name)
    return unpack_codes(rec.values, rec.bits, rec.count, rec.name)


def payload_stats(payload: bytes, max_elements: int = 1 << 31,
                  schema: Mapping[str, tuple[int, ...]] | None = None,
                  spec: str | None = None, block: int = 0) -> PayloadStats:
    """Measure a payload produced by ``encode_update`` (it is parsed and validated; a
    schema-bound one needs the ``schema`` it was encoded for, a spec-implied one the
    canonical ``spec`` and its quantizer ``block``)."""
    _, records = read_payload(payload, max_elements, spec, schema, block)
    bound = entropy_bound = 0.0
    values_bytes, values_entropy = 0, 0.0
    for rec in records:
        quant = rec.value_codec is ValueCodec.QUANT
        bits = rec.bits if quant else _VALUE_BITS[rec.value_codec]
        scales = n_scales(rec.count, rec.block) if quant else 0
        positions = 0.0 if rec.position_codec is PositionCodec.LOWRANK else log2_binomial(
            rec.numel, rec.count)
        fixed = positions + 32 * scales
        bound += fixed + rec.count * bits
        if quant and rec.count:
            h_bytes = entropy.empirical_entropy_bytes(_codes(rec), rec.bits)
            entropy_bound += fixed + 8 * h_bytes
            values_bytes += rec.values.size
            values_entropy += h_bytes
        else:
            entropy_bound += fixed + rec.count * bits
    return PayloadStats(len(payload), sum(r.numel for r in records),
                        sum(r.count for r in records), bound, entropy_bound, values_bytes,
                        values_entropy)
