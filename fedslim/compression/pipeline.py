"""``encode_update`` / ``decode_update``: a model update through a pipeline to bytes and back.

Per tensor the stages run in a fixed order: passthrough check -> top-k selection -> value
stage -> position coding -> bit packing or entropy coding (``ans``) -> (zstd). The heavy
O(n) work (finiteness check, selection, dense scatter) runs in torch on the tensors' own
device; only the kept values and their indices travel to the host for the bit-level coding,
so the same code serves CPU and CUDA. Decoding is deterministic, and
``return_reconstruction`` goes through the very same ``decode_values`` / scatter path as
the decoder, which is why the two are bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np
import torch

from fedslim.compression import buffers, entropy
from fedslim.compression.bitpack import pack_codes, unpack_codes
from fedslim.compression.grammar import parse_spec
from fedslim.compression.positions import PositionCodec, decode_positions, encode_positions
from fedslim.compression.quantize import (
    CAST_CODECS,
    EncodedValues,
    ValueCodec,
    cast_values,
    decode_values,
    encode_values,
)
from fedslim.compression.sparsify import select_topk
from fedslim.compression.spec import (
    CastConfig,
    PipelineSpec,
    PositionCoding,
    QuantizeConfig,
    Scope,
    SelectMode,
    TopKConfig,
)
from fedslim.compression.wire import (
    Packing,
    SourceDtype,
    TensorRecord,
    read_payload,
    write_payload,
)
from fedslim.errors import DecodeError, EncodeError, SpecError

DEFAULT_MAX_ELEMENTS = 1 << 28
_SOURCE = {torch.float32: SourceDtype.F32, torch.float16: SourceDtype.F16,
           torch.bfloat16: SourceDtype.BF16, torch.float64: SourceDtype.F64}
SOURCE_DTYPES = {v: k for k, v in _SOURCE.items()}
_NP_WIRE: dict[ValueCodec, np.dtype[Any]] = {
    ValueCodec.F32: np.dtype("<f4"), ValueCodec.F16: np.dtype("<f2"),
    ValueCodec.BF16: np.dtype("<u2")}


@dataclass(frozen=True)
class DecodedUpdate:
    """What :func:`decode_update` returns.

    Attributes
    ----------
    spec : PipelineSpec
        The pipeline the sender used (read from the payload).
    tensors : dict[str, torch.Tensor]
        float32 tensors in the sender's order and shapes, on the requested device.
    source_dtypes : dict[str, torch.dtype]
        The dtype each tensor had before encoding (informational).
    kept : dict[str, int]
        How many values of each tensor were sent (its ``numel`` when not sparsified): the
        sender's allocation, e.g. of a ``budget:``.
    """

    spec: PipelineSpec
    tensors: dict[str, torch.Tensor]
    source_dtypes: dict[str, torch.dtype]
    kept: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Prepared:
    name: str
    tensor: torch.Tensor
    flat: torch.Tensor  # float32, contiguous, 1-D


def _prepare(name: object, tensor: object) -> _Prepared:
    if not isinstance(name, str):
        raise EncodeError(f"tensor names must be str, got {type(name).__name__} {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise EncodeError(f"tensor name {name!r} cannot be encoded as UTF-8") from None
    if not isinstance(tensor, torch.Tensor):
        raise EncodeError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _SOURCE:
        raise EncodeError(f"tensor {name!r}: unsupported dtype {tensor.dtype}; expected one of "
                          "float32, float16, bfloat16, float64")
    flat = tensor.detach().reshape(-1).to(torch.float32).contiguous()
    if flat.numel():
        lo, hi = torch.aminmax(flat)  # one cheap pass; NaN and Inf propagate into the result
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            bad = int((~torch.isfinite(tensor.detach())).sum())
            reason = (f"contains {bad} NaN/Inf value(s)" if bad
                      else "has values beyond the float32 range")
            raise EncodeError(f"tensor {name!r} {reason}; refusing to encode it "
                              "(check the local training for divergence)")
    return _Prepared(name, tensor, flat)


def _is_passthrough(spec: PipelineSpec, numel: int) -> bool:
    return spec.compresses and numel < spec.passthrough.below


def _host_bytes(enc: EncodedValues, use_entropy: bool
                ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(scales, values) sections as little-endian uint8 arrays on the host, and whether the
    values are entropy-coded (only where that is smaller than the packed codes)."""
    scales = enc.scales.detach().cpu().numpy().astype("<f4", copy=False).view(np.uint8)
    if enc.codec is ValueCodec.QUANT:
        codes = enc.data.cpu().numpy()
        packed = pack_codes(codes, enc.bits)
        if use_entropy and enc.count:
            coded = entropy.encode_codes(codes, enc.bits)
            if len(coded) < packed.size:
                return scales, np.frombuffer(coded, dtype=np.uint8), True
        return scales, packed, False
    data = enc.data.view(torch.int16) if enc.codec is ValueCodec.BF16 else enc.data
    host = data.detach().cpu().numpy().astype(_NP_WIRE[enc.codec], copy=False)
    return scales, host.view(np.uint8), False


def _densify(values: torch.Tensor, idx: torch.Tensor | None, numel: int) -> torch.Tensor:
    if idx is None:
        return values
    dense = buffers.zeros(numel, torch.float32, values.device)
    dense[idx] = values
    return dense


@overload
def encode_update(tensors: Mapping[str, torch.Tensor], spec: PipelineSpec | str, *,
                  generator: torch.Generator | None = ...,
                  return_reconstruction: Literal[False] = ...,
                  max_bytes: int | None = ...) -> bytes: ...


@overload
def encode_update(tensors: Mapping[str, torch.Tensor], spec: PipelineSpec | str, *,
                  generator: torch.Generator | None = ...,
                  return_reconstruction: Literal[True],
                  max_bytes: int | None = ...) -> tuple[bytes, dict[str, torch.Tensor]]:
    ...


@overload
def encode_update(tensors: Mapping[str, torch.Tensor], spec: PipelineSpec | str, *,
                  generator: torch.Generator | None = ...,
                  return_reconstruction: bool,
                  max_bytes: int | None = ...) -> bytes | tuple[bytes, dict[str, torch.Tensor]]:
    ...


def encode_update(tensors: Mapping[str, torch.Tensor], spec: PipelineSpec | str, *,
                  generator: torch.Generator | None = None,
                  return_reconstruction: bool = False,
                  max_bytes: int | None = None
                  ) -> bytes | tuple[bytes, dict[str, torch.Tensor]]:
    """Encode a model update (name -> tensor) into one self-describing payload.

    Parameters
    ----------
    tensors : Mapping[str, torch.Tensor]
        Any float dtype (float32/float16/bfloat16/float64), any device, any shape; the
        order is kept. Values must be finite.
    spec : PipelineSpec or str
        The pipeline; it is written into the payload so the decoder needs no argument.
    generator : torch.Generator, optional
        Source of randomness (stochastic rounding, threshold sampling) for reproducibility.
    return_reconstruction : bool
        Also return what the decoder will produce, bit for bit (float32, input shapes, on
        the input's device) -- computed from the coded values, without a second decode.
    max_bytes : int, optional
        With a ``budget:`` spec, the payload size to fit instead of the spec's own budget
        (a caller that sends other bytes with the payload passes what is left for it).

    Raises
    ------
    SpecError
        If ``spec`` does not parse.
    EncodeError
        On NaN/Inf, unsupported dtypes, non-str names, values a cast cannot represent, or
        a budget below the update's fixed cost.
    """
    spec = parse_spec(spec)
    if not isinstance(tensors, Mapping):
        raise EncodeError(f"expected a mapping of name -> tensor, got {type(tensors).__name__}")
    prepared = [_prepare(name, t) for name, t in tensors.items()]
    if spec.topk is not None and spec.topk.is_budget:
        from fedslim.compression.budget import encode_within

        total = sum(p.flat.numel() for p in prepared)
        limit = spec.topk.budget_for(total) if max_bytes is None else max_bytes
        pool = sum(p.flat.numel() for p in prepared
                   if not _is_passthrough(spec, p.flat.numel()))
        payload, recon = encode_within(
            lambda k: encode_prepared(prepared, spec, TopKConfig(count=k, scope=Scope.GLOBAL),
                                      generator, return_reconstruction),
            limit, pool, spec)
        return (payload, recon) if return_reconstruction else payload
    payload, recon = encode_prepared(prepared, spec, spec.topk, generator,
                                     return_reconstruction)
    return (payload, recon) if return_reconstruction else payload


def encode_prepared(prepared: list[_Prepared], spec: PipelineSpec, select: TopKConfig | None,
                    generator: torch.Generator | None, return_reconstruction: bool
                    ) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The payload (and reconstruction, if asked) with selection ``select``."""
    selected: dict[str, torch.Tensor] = {}
    if select is not None:
        pool = [p for p in prepared if not _is_passthrough(spec, p.flat.numel())]
        chosen = select_topk([p.flat for p in pool], select, generator)
        selected = {p.name: idx for p, idx in zip(pool, chosen, strict=True)}
    records: list[TensorRecord] = []
    recon: dict[str, torch.Tensor] = {}
    for p in prepared:
        numel, where = p.flat.numel(), f"tensor {p.name!r}"
        idx = selected.get(p.name)
        if idx is not None and idx.numel() == numel:
            idx = None  # everything kept: no positions to send
        if _is_passthrough(spec, numel):
            enc = cast_values(p.flat, spec.passthrough.precision, where)
        else:
            values = p.flat if idx is None else p.flat[idx]
            enc = encode_values(values, spec.values, generator, where)
        if idx is None:
            pos_codec, rice, pos_data = PositionCodec.ALL, 0, np.zeros(0, dtype=np.uint8)
        else:
            coded = encode_positions(idx.cpu().numpy(), numel, spec.positions)
            pos_codec, rice, pos_data = coded.codec, coded.param, coded.data
        scales, values_bytes, ans = _host_bytes(enc, spec.entropy is not None)
        records.append(TensorRecord(
            p.name, _SOURCE[p.tensor.dtype], tuple(p.tensor.shape), enc.codec, enc.bits,
            enc.block, pos_codec, rice, enc.count, pos_data, scales, values_bytes,
            entropy=ans))
        if return_reconstruction:
            sent = _densify(decode_values(enc), idx, numel)
            if sent.numel() and sent.data_ptr() == p.tensor.data_ptr():
                sent = sent.clone()  # lossless path: never hand back an alias of the input
            recon[p.name] = sent.view(p.tensor.shape)
    return write_payload(str(spec), records, spec.zstd.level if spec.zstd else None), recon


def _check_against_spec(spec: PipelineSpec, rec: TensorRecord, where: str) -> None:
    """A record must be something its payload's own spec could have produced."""
    values = spec.values
    if _is_passthrough(spec, rec.numel):
        ok = (rec.value_codec is CAST_CODECS[spec.passthrough.precision]
              and rec.position_codec is PositionCodec.ALL)
        expected = f"passthrough {spec.passthrough.precision.value} with all positions"
    elif isinstance(values, CastConfig):
        ok = rec.value_codec is CAST_CODECS[values.precision]
        expected = f"{values.precision.value} values"
    else:
        bits = values.bits if isinstance(values, QuantizeConfig) else 1
        ok = (rec.value_codec is ValueCodec.QUANT and rec.bits == bits
              and rec.block == values.block)
        expected = f"{bits}-bit quantized values with block {values.block}"
    if ok and rec.position_codec is not PositionCodec.ALL:
        allowed = {PositionCoding.AUTO: (PositionCodec.BITMAP, PositionCodec.RICE),
                   PositionCoding.BITMAP: (PositionCodec.BITMAP,),
                   PositionCoding.GOLOMB: (PositionCodec.RICE,)}[spec.positions]
        ok = spec.topk is not None and rec.position_codec in allowed
        expected = f"positions coded as {spec.positions.value}" if spec.topk else "no top-k"
    if ok and spec.topk is not None and not _is_passthrough(spec, rec.numel):
        if (spec.topk.scope is Scope.TENSOR and spec.topk.mode is SelectMode.EXACT
                and not spec.topk.is_budget):
            ok = rec.count == spec.topk.k_for(rec.numel)
            expected = f"exactly {spec.topk.k_for(rec.numel)} kept values"
    if ok and rec.packing is Packing.ZSTD and spec.zstd is None:
        ok, expected = False, "no zstd packing"
    if ok and rec.entropy and spec.entropy is None:
        ok, expected = False, "no entropy-coded values"
    if not ok:
        raise DecodeError(f"{where}: record does not match the payload's spec {str(spec)!r}: "
                          f"expected {expected}")


def _values_from_record(rec: TensorRecord, device: torch.device, where: str) -> EncodedValues:
    if rec.value_codec is ValueCodec.QUANT:
        codes = (entropy.decode_codes(rec.values, rec.bits, rec.count, f"{where}: values")
                 if rec.entropy else unpack_codes(rec.values, rec.bits, rec.count,
                                                  f"{where}: values"))
        scales = np.frombuffer(rec.scales, dtype="<f4").astype(np.float32)
        if scales.size and not (np.isfinite(scales).all() and (scales >= 0).all()):
            raise DecodeError(f"{where}: scales must be finite and >= 0, got min "
                              f"{scales.min()!r} / max {scales.max()!r}")
        return EncodedValues(ValueCodec.QUANT, rec.count, torch.from_numpy(codes).to(device),
                             torch.from_numpy(scales).to(device), rec.bits, rec.block)
    host = np.frombuffer(rec.values, dtype=_NP_WIRE[rec.value_codec])
    data = torch.from_numpy(host.astype(host.dtype.newbyteorder("="), copy=True))
    if rec.value_codec is ValueCodec.BF16:
        data = data.view(torch.int16).view(torch.bfloat16)
    return EncodedValues(rec.value_codec, rec.count, data.to(device), torch.zeros(0))


def decode_update(payload: bytes | bytearray | memoryview, *,
                  max_elements: int = DEFAULT_MAX_ELEMENTS,
                  device: str | torch.device = "cpu",
                  expected_spec: PipelineSpec | str | None = None,
                  schema: Mapping[str, tuple[int, ...]] | None = None) -> DecodedUpdate:
    """Validate and decode a payload made by :func:`encode_update`.

    Parameters
    ----------
    payload : bytes-like
        The full payload, as sent.
    max_elements : int
        Upper bound on the total elements of all tensors; checked before any allocation, so
        a hostile header cannot make the decoder allocate more than ~4 bytes per element.
        A receiver passes its model's size.
    device : str or torch.device
        Where the decoded tensors are materialised.
    expected_spec : PipelineSpec or str, optional
        The pipeline the receiver asked for; another one is rejected when the spec string
        is read, before any record.
    schema : mapping of name -> shape, optional
        The receiver's tensors: a record with another name or shape is rejected when its
        header is read, before its data.

    Raises
    ------
    DecodeError
        For anything malformed: bad magic/version/flags, truncation, checksum, lengths,
        shapes over the limit, out-of-range or miscounted positions, non-finite scales or
        values, records that contradict the payload's spec, trailing bytes.
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise DecodeError(f"payload must be bytes-like, got {type(payload).__name__}")
    try:
        return _decode(payload, max_elements, device, expected_spec, schema)
    except DecodeError:
        raise
    except (MemoryError, ValueError, TypeError, OverflowError, IndexError, KeyError,
            RuntimeError) as exc:  # whatever a hostile payload provokes: still typed
        raise DecodeError(f"malformed payload ({type(exc).__name__}: {exc})") from None


def _decode(payload: bytes | bytearray | memoryview, max_elements: int,
            device: str | torch.device, expected_spec: PipelineSpec | str | None,
            schema: Mapping[str, tuple[int, ...]] | None) -> DecodedUpdate:
    if isinstance(payload, memoryview) and not payload.contiguous:
        payload = payload.tobytes()
    if max_elements > 1 << 40:
        raise DecodeError(f"max_elements={max_elements} is beyond any model (2^40 cap)")
    expected = None if expected_spec is None else str(parse_spec(expected_spec))
    spec_text, records = read_payload(payload, max_elements, expected, schema)
    try:
        spec = parse_spec(spec_text)
    except SpecError as exc:
        raise DecodeError(f"payload carries an invalid spec: {exc}") from None
    if str(spec) != spec_text:
        raise DecodeError(f"payload spec {spec_text!r} is not canonical ({str(spec)!r})")
    dev = torch.device(device)
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, torch.dtype] = {}
    kept_in_pool, pool_numel = 0, 0
    for i, rec in enumerate(records):
        where = f"tensor #{i} {rec.name[:80]!r}"
        _check_against_spec(spec, rec, where)
        if not _is_passthrough(spec, rec.numel):
            kept_in_pool, pool_numel = kept_in_pool + rec.count, pool_numel + rec.numel
        idx = decode_positions(rec.position_codec, rec.rice_param, rec.positions, rec.count,
                               rec.numel, where)
        values = decode_values(_values_from_record(rec, dev, where))
        if rec.value_codec is not ValueCodec.QUANT and values.numel():
            lo, hi = torch.aminmax(values)
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                raise DecodeError(f"{where}: values contain NaN or Inf")
        index = None if idx is None else torch.from_numpy(idx).to(dev)
        tensors[rec.name] = _densify(values, index, rec.numel).view(rec.shape)
        sources[rec.name] = SOURCE_DTYPES[rec.source_dtype]
    topk = spec.topk
    if topk is not None and topk.is_budget:
        limit = topk.budget_for(sum(rec.numel for rec in records))
        if len(payload) > limit:
            raise DecodeError(f"payload is {len(payload)} bytes, over its spec's budget "
                              f"({limit} bytes)")
    elif topk is not None and topk.scope is Scope.GLOBAL and topk.mode is SelectMode.EXACT:
        if kept_in_pool != topk.k_for(pool_numel):
            raise DecodeError(f"global top-k payload keeps {kept_in_pool} values, spec "
                              f"{str(spec)!r} implies {topk.k_for(pool_numel)}")
    return DecodedUpdate(spec, tensors, sources, {rec.name: rec.count for rec in records})


__all__ = ["DecodedUpdate", "decode_update", "encode_update"]
