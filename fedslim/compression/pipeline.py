"""``encode_update``: a model update through a pipeline to bytes (the decoder is in
:mod:`fedslim.compression.decoder`).

Per tensor the stages run in a fixed order: passthrough check -> selection (top-k, budget)
or low-rank factors -> value stage -> position coding -> bit packing or entropy coding
(``ans``) -> (zstd). The heavy
O(n) work (finiteness check, selection, dense scatter) runs in torch on the tensors' own
device; only the kept values and their indices travel to the host for the bit-level coding,
so the same code serves CPU and CUDA. Decoding is deterministic, and
``return_reconstruction`` goes through the very same ``decode_values`` / scatter / low-rank
product as the decoder, which is why the two are bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
import torch

from fedslim.compression import buffers, entropy, lowrank
from fedslim.compression.bitpack import pack_codes
from fedslim.compression.budget import encode_within
from fedslim.compression.fidelity import select_energy
from fedslim.compression.grammar import parse_spec
from fedslim.compression.positions import PositionCodec, encode_positions
from fedslim.compression.quantize import (
    EncodedValues,
    ValueCodec,
    cast_values,
    decode_values,
    encode_values,
)
from fedslim.compression.sparsify import select_topk
from fedslim.compression.spec import (
    PipelineSpec,
    Scope,
    TopKConfig,
)
from fedslim.compression.wire import (
    SourceDtype,
    TensorRecord,
    write_payload,
)
from fedslim.errors import EncodeError

DEFAULT_MAX_ELEMENTS = 1 << 28
State = dict[str, torch.Tensor]
_SOURCE = {torch.float32: SourceDtype.F32, torch.float16: SourceDtype.F16,
           torch.bfloat16: SourceDtype.BF16, torch.float64: SourceDtype.F64}
SOURCE_DTYPES = {v: k for k, v in _SOURCE.items()}
_NP_WIRE: dict[ValueCodec, np.dtype[Any]] = {
    ValueCodec.F32: np.dtype("<f4"), ValueCodec.F16: np.dtype("<f2"),
    ValueCodec.BF16: np.dtype("<u2")}


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


def zeroed(out: torch.Tensor | None, numel: int, device: torch.device) -> torch.Tensor:
    """A zero float32 vector of ``numel``: ``out`` (zeroed here) when it is a contiguous
    buffer of that size on ``device``, else a new one."""
    if out is not None and buffers.fits(out, numel, torch.float32, device):
        dense = out.view(-1)
        dense.zero_()
        return dense
    return buffers.zeros(numel, torch.float32, device)


def _densify(values: torch.Tensor, idx: torch.Tensor | None, numel: int,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``values`` scattered to ``idx`` in a zero tensor of ``numel`` -- ``out`` (zeroed
    here) when it is a contiguous float32 buffer of that size on that device."""
    if idx is None:
        return values
    dense = zeroed(out, numel, values.device)
    dense[idx] = values
    return dense


@overload
def encode_update(tensors: Mapping[str, torch.Tensor], spec: PipelineSpec | str, *,
                  generator: torch.Generator | None = ...,
                  return_reconstruction: Literal[False] = ...,
                  max_bytes: int | None = ...,
                  lowrank_state: dict[str, torch.Tensor] | None = ...,
                  schema_bound: bool = ...,
                  spec_implied: bool = ...,
                  reconstruction_out: State | None = ...) -> bytes: ...


@overload
def encode_update(tensors: Mapping[str, torch.Tensor], spec: PipelineSpec | str, *,
                  generator: torch.Generator | None = ...,
                  return_reconstruction: Literal[True],
                  max_bytes: int | None = ...,
                  lowrank_state: State | None = ...,
                  schema_bound: bool = ...,
                  spec_implied: bool = ...,
                  reconstruction_out: State | None = ...) -> tuple[bytes, State]:
    ...


@overload
def encode_update(tensors: Mapping[str, torch.Tensor], spec: PipelineSpec | str, *,
                  generator: torch.Generator | None = ...,
                  return_reconstruction: bool,
                  max_bytes: int | None = ...,
                  lowrank_state: State | None = ...,
                  schema_bound: bool = ...,
                  spec_implied: bool = ...,
                  reconstruction_out: State | None = ...) -> bytes | tuple[bytes, State]:
    ...


def encode_update(tensors: Mapping[str, torch.Tensor], spec: PipelineSpec | str, *,
                  generator: torch.Generator | None = None,
                  return_reconstruction: bool = False,
                  max_bytes: int | None = None,
                  lowrank_state: dict[str, torch.Tensor] | None = None,
                  schema_bound: bool = False,
                  spec_implied: bool = False,
                  reconstruction_out: State | None = None
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
    lowrank_state : dict, optional
        With a ``lowrank:`` spec, each factorised tensor's ``Q`` from the last call (its
        warm start); updated in place. Without it every call starts from a random ``Q``.
    schema_bound : bool
        Leave tensor names, dtypes and shapes out (a 4-byte digest of the sorted (name,
        shape) list instead) and every length the record's fields imply: for a receiver
        that holds the model, which must pass ``schema=`` to :func:`decode_update`. All
        tensors must then share one dtype.
    spec_implied : bool
        With ``schema_bound``: leave the spec string (and the quantizer block) out too, for
        a receiver that asked for this spec and passes it as ``expected_spec=``.
    reconstruction_out : dict, optional
        Float32 buffers by tensor name (see :func:`fedslim.compression.buffers.scratch`):
        a sparse tensor's reconstruction is written into its buffer instead of a new
        tensor (not with ``budget:``, which tries several selections). They must not be
        the input tensors.

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
        total = sum(p.flat.numel() for p in prepared)
        limit = spec.topk.budget_for(total) if max_bytes is None else max_bytes
        pool = sum(p.flat.numel() for p in prepared
                   if not _is_passthrough(spec, p.flat.numel()))
        payload, recon = encode_within(
            lambda k: encode_prepared(prepared, spec, TopKConfig(count=k, scope=Scope.GLOBAL),
                                      generator, return_reconstruction, None, schema_bound,
                                      spec_implied),
            limit, pool, spec)
        return (payload, recon) if return_reconstruction else payload
    select: TopKConfig | dict[str, torch.Tensor] | None = spec.topk
    if spec.topk is not None and spec.topk.energy is not None:
        kept = [p for p in prepared if not _is_passthrough(spec, p.flat.numel())]
        chosen = select_energy([p.flat for p in kept], spec.topk, generator)
        select = {p.name: idx for p, idx in zip(kept, chosen, strict=True)}
    payload, recon = encode_prepared(prepared, spec, select, generator,
                                     return_reconstruction, lowrank_state, schema_bound,
                                     spec_implied, reconstruction_out)
    return (payload, recon) if return_reconstruction else payload


def encode_prepared(prepared: list[_Prepared], spec: PipelineSpec,
                    select: TopKConfig | dict[str, torch.Tensor] | None,
                    generator: torch.Generator | None, return_reconstruction: bool,
                    lowrank_state: dict[str, torch.Tensor] | None, schema_bound: bool = False,
                    spec_implied: bool = False, out: State | None = None
                    ) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The payload (and reconstruction, if asked, into ``out``'s buffers where they fit)
    with selection ``select`` (a top-k config, or the kept indices per tensor name)."""
    selected: dict[str, torch.Tensor] = {}
    if isinstance(select, dict):
        selected = select
    elif select is not None:
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
        shape = tuple(p.tensor.shape)
        rank = _rank_of(spec, shape, numel)
        if _is_passthrough(spec, numel):
            enc = cast_values(p.flat, spec.passthrough.precision, where)
        elif rank:
            warm = None if lowrank_state is None else lowrank_state.get(p.name)
            values, q = lowrank.factorize(p.flat, shape, rank, warm, generator)
            if lowrank_state is not None:
                lowrank_state[p.name] = q.detach().cpu()
            enc = encode_values(values, spec.values, generator, where)
        else:
            values = p.flat if idx is None else p.flat[idx]
            enc = encode_values(values, spec.values, generator, where)
        if rank:
            pos_codec, rice, pos_data = PositionCodec.LOWRANK, rank, np.zeros(0, np.uint8)
        elif idx is None:
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
            into = None if out is None else out.get(p.name)
            if into is not None and into.data_ptr() == p.tensor.data_ptr():
                into = None  # (never write over the input)
            sent = (lowrank.reconstruct(decode_values(enc), shape, numel, rank, where) if rank
                    else _densify(decode_values(enc), idx, numel, into))
            if sent.numel() and sent.data_ptr() == p.tensor.data_ptr():
                sent = sent.clone()  # lossless path: never hand back an alias of the input
            recon[p.name] = sent.view(p.tensor.shape)
    return write_payload(str(spec), records, spec.zstd.level if spec.zstd else None,
                         schema_bound, spec_implied), recon


def _rank_of(spec: PipelineSpec, shape: tuple[int, ...], numel: int) -> int:
    """The rank a ``lowrank:`` spec factorises this tensor at; 0 when it goes dense."""
    if spec.lowrank is None or _is_passthrough(spec, numel):
        return 0
    if lowrank.factor_count(shape, numel, spec.lowrank.rank) is None:
        return 0
    m, n = lowrank.matrix_shape(shape, numel) or (0, 0)
    return min(spec.lowrank.rank, m, n)



__all__ = ["encode_update", "encode_prepared"]
