"""The information bound a payload is measured against.

For each tensor with ``n`` elements of which ``k`` are sent at ``b`` bits each, plus ``m``
float32 scales, no code can do better than ``log2 C(n, k) + k*b + 32*m`` bits without
modelling the values themselves: ``log2 C(n, k)`` is the cost of saying *which* k of n were
kept. Reporting payload bits over this bound shows how much the position code, headers and
names waste -- the benchmark target for ``topk:0.01|q:4`` is at most 1.10x.

The *entropy bound* replaces ``k*b`` by ``k * H(codes)``, the empirical entropy of the
quantized codes actually sent: the least any coder of those codes can write without a
better model than their histogram. It is what the ``ans`` stage is measured against.

No coder reaches it on short records. A coder that must take every sequence of ``n`` codes
from an alphabet of ``m`` (it has no prior knowledge of the histogram) pays, on some
sequence, at least the *minimax regret* ``log2 C(m, n)`` bits above that sequence's empirical
entropy, where ``C(m, n) = sum over x of prod_i (c_i(x)/n)^c_i(x)`` is the Shtarkov sum of the
multinomial family; the normalised maximum-likelihood code pays exactly that on every
sequence (Shtarkov 1987; Kontkanen & Myllymaki 2007 give the recurrence used here). That
holds for a prefix-free code. A record's values section is not: its length travels
separately (fewer than ``ceil(n B / 8)`` bytes when entropy-coded, exactly that when packed,
one bit says which), so its Kraft sum can reach ``J = 2 ceil(n B / 8)`` and the bound loses
``log2 J`` bits. Since ``n H(x) <= n B`` for ``B``-bit codes, *every* coder writes some
``n``-code record at no less than ``1 + (log2 C(2^B, n) - log2 J) / (n B)`` times its
empirical entropy (:func:`entropy_floor`): below the ``n`` where that exceeds 1.05, no coder
can promise 1.05x on every record. (It is a necessary condition, not a sufficient one: on
a record of one repeated code the entropy is 0 and no coder reaches any finite ratio.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedslim.compression import entropy
from fedslim.compression.bitpack import unpack_codes
from fedslim.compression.positions import PositionCodec
from fedslim.compression.quantize import ValueCodec, n_scales
from fedslim.compression.wire import TensorRecord
from fedslim.compression.wire_read import read_payload

_VALUE_BITS = {ValueCodec.F32: 32, ValueCodec.F16: 16, ValueCodec.BF16: 16}


def log2_binomial(n: int, k: int) -> float:
    """``log2 C(n, k)`` via lgamma (exact enough for any n, no big integers)."""
    if k <= 0 or k >= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


_EXACT_MAX = 1 << 20  # longer sequences: the asymptotic expansion (error < 1e-3 bits there)


def nml_regret_bits(alphabet: int, n: int) -> float:
    """``log2 C(alphabet, n)``: the multinomial family's minimax regret for ``n`` symbols.

    Exact up to ``2^20`` symbols: ``C(1, n) = 1``; ``C(2, n) = sum_h binom(n, h) (h/n)^h
    ((n-h)/n)^(n-h)`` (one vectorised log-sum-exp); ``C(m + 2, n) = C(m + 1, n) + n/m C(m,
    n)``. Beyond, Szpankowski's expansion ``(m-1)/2 ln(n/2) + ln(sqrt(pi) / Gamma(m/2)) +
    sqrt(2) m Gamma(m/2) / (3 Gamma(m/2 - 1/2) sqrt(n))`` (in nats).
    """
    if alphabet < 1 or n < 0:
        raise ValueError(f"nml_regret_bits needs alphabet >= 1 and n >= 0, got {alphabet}, {n}")
    if alphabet == 1 or n == 0:
        return 0.0
    if n > _EXACT_MAX:
        m = alphabet
        nats = ((m - 1) / 2 * math.log(n / 2) + 0.5 * math.log(math.pi) - math.lgamma(m / 2)
                + math.sqrt(2) * m * math.exp(math.lgamma(m / 2) - math.lgamma((m - 1) / 2))
                / (3 * math.sqrt(n)))
        return nats / math.log(2)
    h = torch.arange(n + 1, dtype=torch.float64)
    total = torch.tensor(float(n), dtype=torch.float64)
    log_binom = torch.lgamma(total + 1) - torch.lgamma(h + 1) - torch.lgamma(total - h + 1)
    log_ml = torch.xlogy(h, h / total) + torch.xlogy(total - h, (total - h) / total)
    older, newer = 0.0, float(torch.logsumexp(log_binom + log_ml, 0))  # ln C(1), ln C(2)
    for m in range(1, alphabet - 1):
        older, newer = newer, float(np.logaddexp(newer, math.log(n / m) + older))
    return newer / math.log(2)


def entropy_floor(bits: int, n: int) -> float:
    """A ratio (values-section bytes over empirical entropy) that every coder reaches or
    exceeds on some record of ``n`` ``bits``-bit codes: ``1 + (log2 C(2^bits, n) - log2
    (2 ceil(n bits / 8))) / (n bits)`` (see the module docstring)."""
    if not n:
        return float("inf")
    slack = math.log2(2 * math.ceil(n * bits / 8))
    return 1.0 + max(0.0, nml_regret_bits(1 << bits, n) - slack) / (n * bits)


class EntropyRatios:
    """Bytes sent and what NML would send, over the empirical entropy (``inf`` at 0)."""

    values_bytes: float
    entropy_bytes: float
    regret_bytes: float

    @property
    def over_entropy(self) -> float:
        return self.values_bytes / self.entropy_bytes if self.entropy_bytes else float("inf")

    @property
    def nml_over_entropy(self) -> float:
        """What the NML code would write, over the entropy."""
        return ((self.entropy_bytes + self.regret_bytes) / self.entropy_bytes
                if self.entropy_bytes else float("inf"))


@dataclass(frozen=True)
class RecordEntropy(EntropyRatios):
    """One quantized record's values section next to its codes' empirical entropy.

    ``regret_bytes`` is ``log2 C(2^bits, count) / 8``: what the minimax-optimal coder that
    learns the histogram from the data (NML) writes above the entropy, on every record.
    """

    name: str
    count: int
    bits: int
    distinct: int
    entropy_coded: bool
    values_bytes: int
    entropy_bytes: float
    regret_bytes: float

    @property
    def floor(self) -> float:
        """:func:`entropy_floor` for this record's size: every coder reaches it on some
        record of this many codes."""
        return entropy_floor(self.bits, self.count)


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


def record_entropy(payload: bytes, max_elements: int = 1 << 31,
                   schema: Mapping[str, tuple[int, ...]] | None = None,
                   spec: str | None = None, block: int = 0) -> list[RecordEntropy]:
    """Per quantized record with values (arguments as :func:`payload_stats`)."""
    _, records = read_payload(payload, max_elements, spec, schema, block)
    out = []
    for rec in records:
        if rec.value_codec is not ValueCodec.QUANT or not rec.count:
            continue
        codes = _codes(rec)
        out.append(RecordEntropy(rec.name, rec.count, rec.bits, int(np.unique(codes).size),
                                 rec.entropy, rec.values.size,
                                 entropy.empirical_entropy_bytes(codes, rec.bits),
                                 nml_regret_bits(1 << rec.bits, rec.count) / 8))
    return out


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
