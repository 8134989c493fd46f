"""``decode_update``: a payload back to tensors, validated against the spec it claims.

Everything a hostile sender controls is checked by the wire reader (lengths, counts, shapes,
limits; see :mod:`fedslim.compression.wire`) before anything is allocated; here each record
must be something the payload's own spec could have produced, and the decoded values must
be finite. Decoding goes through the same ``decode_values`` / scatter / low-rank product as
the encoder's ``return_reconstruction``, which is why the two are bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from fedslim.compression import entropy, lowrank
from fedslim.compression.bitpack import unpack_codes
from fedslim.compression.buffers import all_finite
from fedslim.compression.grammar import parse_spec
from fedslim.compression.pipeline import (
    _NP_WIRE,
    DEFAULT_MAX_ELEMENTS,
    SOURCE_DTYPES,
    _densify,
    _is_passthrough,
    _rank_of,
    zeroed,
)
from fedslim.compression.positions import (
    PositionCodec,
    bitmap_mask,
    decode_positions,
    iter_rice,
)
from fedslim.compression.quantize import (
    CAST_CODECS,
    EncodedValues,
    ValueCodec,
    decode_values,
)
from fedslim.compression.spec import (
    CastConfig,
    PipelineSpec,
    PositionCoding,
    QuantizeConfig,
    Scope,
    SelectMode,
)
from fedslim.compression.wire import Packing, TensorRecord
from fedslim.compression.wire_read import read_payload
from fedslim.errors import DecodeError, SpecError


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


def _check_against_spec(spec: PipelineSpec, rec: TensorRecord, where: str) -> None:
    """A record must be something its payload's own spec could have produced."""
    rank = _rank_of(spec, rec.shape, rec.numel)
    if (rec.position_codec is PositionCodec.LOWRANK) != bool(rank) or (
            rank and (rec.rice_param != rank
                      or rec.count != lowrank.factor_count(rec.shape, rec.numel, rank))):
        raise DecodeError(f"{where}: record does not match the payload's spec {str(spec)!r}: "
                          + (f"expected rank-{rank} factors" if rank else "expected no factors"))
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
    if ok and rec.position_codec not in (PositionCodec.ALL, PositionCodec.LOWRANK):
        allowed = {PositionCoding.AUTO: (PositionCodec.BITMAP, PositionCodec.RICE),
                   PositionCoding.BITMAP: (PositionCodec.BITMAP,),
                   PositionCoding.GOLOMB: (PositionCodec.RICE,)}[spec.positions]
        ok = spec.topk is not None and rec.position_codec in allowed
        expected = f"positions coded as {spec.positions.value}" if spec.topk else "no top-k"
    if ok and spec.topk is not None and not _is_passthrough(spec, rec.numel):
        if (spec.topk.scope is Scope.TENSOR and spec.topk.mode is SelectMode.EXACT
                and not spec.topk.is_adaptive):
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
                  schema: Mapping[str, tuple[int, ...]] | None = None,
                  out: Mapping[str, torch.Tensor] | None = None) -> DecodedUpdate:
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
    out : mapping of name -> tensor, optional
        Float32 buffers (see :func:`fedslim.compression.buffers.scratch`): a sparse
        record is densified into its tensor's buffer, when it fits, instead of a new one.

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
        return _decode(payload, max_elements, device, expected_spec, schema, out)
    except DecodeError:
        raise
    except (MemoryError, ValueError, TypeError, OverflowError, IndexError, KeyError,
            RuntimeError) as exc:  # whatever a hostile payload provokes: still typed
        raise DecodeError(f"malformed payload ({type(exc).__name__}: {exc})") from None


def _scatter_masked(values: torch.Tensor, mask: np.ndarray, numel: int,
                    out: torch.Tensor | None) -> torch.Tensor:
    """``values`` placed at the set elements of ``mask`` in order, the rest zero: the same
    tensor as ``_densify`` with ``flatnonzero(mask)``, without the 8-byte index array."""
    dense = zeroed(out, numel, values.device)
    dense.masked_scatter_(torch.from_numpy(mask).to(values.device).view(torch.bool), values)
    return dense


def _scatter_rice(values: torch.Tensor, rec: TensorRecord, out: torch.Tensor | None,
                  where: str) -> torch.Tensor:
    """``values`` placed at a golomb section's indices, decoded and placed a chunk at a
    time (the same tensor as ``_densify`` with ``decode_positions``)."""
    dense = zeroed(out, rec.numel, values.device)
    chunks = iter_rice(rec.positions, rec.rice_param, rec.count, rec.numel, where)
    if dense.device.type == "cpu":  # numpy: one thread, no intra-op barrier per chunk
        flat, vals = dense.numpy(), values.numpy()
        for start, idx in chunks:
            flat[idx] = vals[start:start + idx.size]
        return dense
    for start, idx in chunks:
        dense[torch.from_numpy(idx).to(values.device)] = values[start:start + idx.size]
    return dense


def _decode(payload: bytes | bytearray | memoryview, max_elements: int,
            device: str | torch.device, expected_spec: PipelineSpec | str | None,
            schema: Mapping[str, tuple[int, ...]] | None,
            out: Mapping[str, torch.Tensor] | None = None) -> DecodedUpdate:
    if isinstance(payload, memoryview) and not payload.contiguous:
        payload = payload.tobytes()
    if max_elements > 1 << 40:
        raise DecodeError(f"max_elements={max_elements} is beyond any model (2^40 cap)")
    asked = None if expected_spec is None else parse_spec(expected_spec)
    block = getattr(asked.values, "block", 0) if asked is not None else 0
    spec_text, records = read_payload(payload, max_elements,
                                      None if asked is None else str(asked), schema, block)
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
        lowrank_rec = rec.position_codec is PositionCodec.LOWRANK
        bitmap = rec.position_codec is PositionCodec.BITMAP
        rice = rec.position_codec is PositionCodec.RICE
        mask = bitmap_mask(rec.positions, rec.count, rec.numel, where) if bitmap else None
        idx = None if lowrank_rec or bitmap or rice else decode_positions(
            rec.position_codec, rec.rice_param, rec.positions, rec.count, rec.numel, where)
        buf = None if out is None else out.get(rec.name)
        dense_values = rec.position_codec is PositionCodec.ALL
        values = decode_values(_values_from_record(rec, dev, where),
                               buf if dense_values else None)
        if rec.value_codec is not ValueCodec.QUANT and values.numel():
            lo, hi = torch.aminmax(values)
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                raise DecodeError(f"{where}: values contain NaN or Inf")
        index = None if idx is None else torch.from_numpy(idx).to(dev)
        if lowrank_rec:
            dense = lowrank.reconstruct(values, rec.shape, rec.numel, rec.rice_param, where, buf)
        elif mask is not None:
            dense = _scatter_masked(values, mask, rec.numel, buf)
        elif rice:
            dense = _scatter_rice(values, rec, buf, where)
        else:
            dense = _densify(values, index, rec.numel, buf)
        if lowrank_rec and not all_finite(dense):
            raise DecodeError(f"{where}: low-rank factors multiply out to NaN or Inf")
        tensors[rec.name] = dense.view(rec.shape)
        sources[rec.name] = SOURCE_DTYPES[rec.source_dtype]
    topk = spec.topk
    if topk is not None and topk.is_budget:
        limit = topk.budget_for(sum(rec.numel for rec in records))
        if len(payload) > limit:
            raise DecodeError(f"payload is {len(payload)} bytes, over its spec's budget "
                              f"({limit} bytes)")
    elif (topk is not None and topk.scope is Scope.GLOBAL and topk.mode is SelectMode.EXACT
          and not topk.is_adaptive):
        if kept_in_pool != topk.k_for(pool_numel):
            raise DecodeError(f"global top-k payload keeps {kept_in_pool} values, spec "
                              f"{str(spec)!r} implies {topk.k_for(pool_numel)}")
    return DecodedUpdate(spec, tensors, sources, {rec.name: rec.count for rec in records})


__all__ = ["DecodedUpdate", "decode_update"]
