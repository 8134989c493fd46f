"""Value stages: uniform quantization, sign, and the fp32/fp16/bf16 casts.

Every value stage maps a 1-D float32 tensor of kept values to :class:`EncodedValues` and back.
Quantized values use ``L = 2**bits`` levels ``s * lut[j]`` with ``lut[j] = (2j - (L-1)) / (L-1)``
spanning ``[-s, s]``; ``s`` is one float32 scale per block. Decoding is one table gather:
``table[b, j] = fl(s_b * lut[j])`` -- a single correctly rounded multiply -- so CPU and CUDA,
encoder-side reconstruction and decoder, all produce bit-identical floats (the downlink relies
on that). The math runs in torch on the values' device; nothing here loops over elements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache

import numpy as np
import torch

from fedslim.compression import buffers
from fedslim.compression.spec import (
    CastConfig,
    Precision,
    QuantizeConfig,
    Rounding,
    ScaleStat,
    SignConfig,
    ValueConfig,
)
from fedslim.errors import EncodeError

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class ValueCodec(IntEnum):
    """Wire identifiers of value codings (one byte in each tensor record)."""

    F32 = 0
    F16 = 1
    BF16 = 2
    QUANT = 3


CAST_CODECS = {Precision.FP32: ValueCodec.F32, Precision.FP16: ValueCodec.F16,
               Precision.BF16: ValueCodec.BF16}
CAST_DTYPES = {ValueCodec.F32: torch.float32, ValueCodec.F16: torch.float16,
               ValueCodec.BF16: torch.bfloat16}


@dataclass(frozen=True)
class EncodedValues:
    """Kept values in coded form, still as tensors on the encoder's device.

    Attributes
    ----------
    codec : ValueCodec
    count : int
        Number of values.
    data : torch.Tensor
        For casts: the values in the cast dtype. For ``QUANT``: uint8 codes, one per value.
    scales : torch.Tensor
        float32, one per block (``QUANT`` only; empty otherwise).
    bits, block : int
        Quantizer width and block length (0 = one block for the whole tensor).
    """

    codec: ValueCodec
    count: int
    data: torch.Tensor
    scales: torch.Tensor
    bits: int = 0
    block: int = 0


def n_scales(count: int, block: int) -> int:
    """Number of scales for ``count`` quantized values with block length ``block``."""
    if count == 0:
        return 0
    return 1 if block == 0 else -(-count // block)


@lru_cache(maxsize=32)
def _lut(bits: int, device: torch.device) -> torch.Tensor:
    levels = (1 << bits) - 1
    table = [(2 * j - levels) / levels for j in range(levels + 1)]  # exact in float64
    return torch.tensor(table, dtype=torch.float64).to(torch.float32).to(device)


def _blocks(values: torch.Tensor, block: int) -> torch.Tensor:
    """View ``values`` as (n_blocks, block_len), zero-padding the last block."""
    count = values.numel()
    if block == 0 or block >= count:
        return values.view(1, count)
    pad = (-count) % block
    if pad:
        values = torch.cat([values, values.new_zeros(pad)])
    return values.view(-1, block)


def _absmax(grid: torch.Tensor) -> torch.Tensor:
    """max |v| per row; aminmax is one read pass (abs().amax() would write a copy)."""
    lo, hi = torch.aminmax(grid, dim=1)
    return torch.maximum(-lo, hi)


def _uniform(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None
             ) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def _quantize(values: torch.Tensor, cfg: QuantizeConfig, generator: torch.Generator | None,
              where: str) -> EncodedValues:
    count, levels = values.numel(), (1 << cfg.bits) - 1
    if count == 0:
        return EncodedValues(ValueCodec.QUANT, 0, values.new_zeros(0, dtype=torch.uint8),
                             values.new_zeros(0), cfg.bits, cfg.block)
    grid = _blocks(values, cfg.block)
    smax = _absmax(grid)
    scales = smax
    if cfg.scale is ScaleStat.NORM:  # QSGD; computed relative to the max so it cannot overflow
        unit = grid / torch.where(smax > 0, smax, 1.0)[:, None]
        norm = smax * torch.linalg.vector_norm(unit, dim=1)
        scales = torch.maximum(norm, smax).clamp(max=FLOAT32_MAX)
    # |v| <= s, so v / s is in [-1, 1] and (v / s + 1) * (L-1)/2 in [0, L-1] exactly (IEEE
    # division and multiplication are monotonic), with no clamp; a tiny s cannot overflow.
    pos = buffers.empty(grid.numel(), torch.float32, grid.device).view(grid.shape)
    torch.div(grid, torch.where(scales > 0, scales, 1.0)[:, None], out=pos)
    pos.add_(1.0).mul_(levels / 2.0)
    if cfg.rounding is Rounding.NEAREST:
        pos.round_()
    else:  # floor(p) + Bernoulli(frac(p)): E[code] == p, so E[decoded] == input
        low = torch.floor(pos)
        frac = pos.sub_(low)
        pos = low.add_((_uniform(frac.shape, frac, generator) < frac).to(low.dtype))
        pos.clamp_(max=float(levels))  # frac > 0 never happens at L-1; belt and braces
    codes = pos.to(torch.uint8).reshape(-1)[:count]
    return EncodedValues(ValueCodec.QUANT, count, codes, scales.contiguous(), cfg.bits, cfg.block)


def _sign(values: torch.Tensor, cfg: SignConfig, generator: torch.Generator | None,
          where: str) -> EncodedValues:
    count = values.numel()
    if count == 0:
        return EncodedValues(ValueCodec.QUANT, 0, values.new_zeros(0, dtype=torch.uint8),
                             values.new_zeros(0), 1, cfg.block)
    grid = _blocks(values, cfg.block)
    mags = grid.abs()
    smax = _absmax(grid)
    lengths = torch.full_like(smax, float(grid.shape[1]))
    lengths[-1] -= grid.numel() - count  # the padded tail does not count in the mean
    unit_sum = (mags / torch.where(smax > 0, smax, 1.0)[:, None]).sum(dim=1)
    scales = (smax * (unit_sum / lengths)).clamp(max=FLOAT32_MAX)  # mean |v|, overflow-safe
    codes = (values >= 0).to(torch.uint8)
    return EncodedValues(ValueCodec.QUANT, count, codes, scales.contiguous(), 1, cfg.block)


def cast_values(values: torch.Tensor, precision: Precision, where: str) -> EncodedValues:
    """Cast to ``precision``; raises :class:`EncodeError` where a value would overflow it."""
    codec = CAST_CODECS[precision]
    dtype = CAST_DTYPES[codec]
    data = values if dtype == values.dtype else values.to(dtype)
    if dtype != torch.float32 and values.numel():
        lo, hi = torch.aminmax(values)
        extremes = torch.stack([lo, hi]).to(dtype)
        if not bool(torch.isfinite(extremes).all()):
            raise EncodeError(f"{where}: values up to {max(-float(lo), float(hi)):.4g} in "
                              f"magnitude overflow {precision.value}; use fp32, bf16 or q:BITS")
    empty = values.new_zeros(0)
    return EncodedValues(codec, values.numel(), data, empty)


def _cast(values: torch.Tensor, cfg: CastConfig, generator: torch.Generator | None,
          where: str) -> EncodedValues:
    return cast_values(values, cfg.precision, where)


_Encoder = Callable[[torch.Tensor, object, "torch.Generator | None", str], EncodedValues]
_ENCODERS: dict[type, _Encoder] = {
    QuantizeConfig: _quantize,  # type: ignore[dict-item]
    SignConfig: _sign,  # type: ignore[dict-item]
    CastConfig: _cast,  # type: ignore[dict-item]
}


def encode_values(values: torch.Tensor, config: ValueConfig,
                  generator: torch.Generator | None, where: str) -> EncodedValues:
    """Run the value stage ``config`` on 1-D float32 ``values`` (``where`` names the tensor)."""
    return _ENCODERS[type(config)](values, config, generator, where)


def decode_values(enc: EncodedValues, out: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 values of ``enc`` on its device; the only decoding path, encoder and decoder.

    ``out``: a contiguous float32 buffer of ``enc.count`` elements on that device to write
    the values into (same bits; no new tensor of the record's size)."""
    if out is not None and not (out.dtype == torch.float32 and out.is_contiguous()
                                and out.numel() == enc.count
                                and out.device == enc.data.device):
        out = None
    if enc.codec is not ValueCodec.QUANT:
        return enc.data.to(torch.float32) if out is None else out.view(-1).copy_(enc.data)
    return dequantize(enc.data, enc.scales, enc.bits, enc.block, out)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """``scales[b] * lut[codes]`` as one gather from a per-block table (bit-exact anywhere);
    into ``out`` (float32, ``codes.numel()`` elements, same device) when given."""
    count = codes.numel()
    if count == 0:
        return torch.zeros(0, dtype=torch.float32, device=codes.device)
    lut = _lut(bits, codes.device)
    if codes.device.type == "cpu":  # in place, a chunk of indices at a time (no copies)
        flat = torch.empty(count, dtype=torch.float32) if out is None else out.view(-1)
        if scales.numel() == 1:
            _take_into((lut * scales[0]).numpy(), codes.numpy(), flat.numpy())
            return flat
        _take_into(lut.numpy(), codes.numpy(), flat.numpy())
        full = count // block if block else 0
        if full:  # the same single rounding fl(lut[c] * s_b) as the padded grid below
            flat[:full * block].view(full, block).mul_(scales[:full, None])
        if full * block < count:
            flat[full * block:].mul_(scales[full])
        return flat
    if scales.numel() == 1:
        values = _gather(lut * scales[0], codes)
    else:  # fl(lut[c] * s_b): the same single rounding as a per-block table
        values = _blocks(_gather(lut, codes), block).mul_(scales[:, None]).reshape(-1)[:count]
    return values if out is None else out.view(-1).copy_(values)


def _gather(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``table[codes]`` for uint8 codes; numpy on CPU avoids an int64 index copy (5x faster)."""
    if codes.device.type == "cpu":
        out = np.empty(codes.numel(), dtype=np.float32)
        _take_into(table.numpy(), codes.numpy(), out)
        return torch.from_numpy(out)
    return table[codes.to(torch.int64)]


TAKE_CHUNK = 1 << 16


def _take_into(table: np.ndarray, codes: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = table[codes]`` a chunk at a time: ``np.take`` widens its indices to
    int64, so one call over all codes would allocate 8 bytes per code."""
    for a in range(0, codes.size, TAKE_CHUNK):
        np.take(table, codes[a:a + TAKE_CHUNK], out=out[a:a + TAKE_CHUNK])
