"""The fedslim wire format, version 3: framing, tensor records and their validation.

Layout (all integers little-endian; ``varint`` = unsigned LEB128, minimal, <= 10 bytes)::

    header (20 bytes)
      0   4  magic      b"FSLM"
      4   2  version    u16 = 2
      6   2  flags      u16: bit 0 = schema-bound, bit 1 = spec implied (below); any other
                         set bit is rejected
      8   8  body_len   u64, bytes after the header (must match exactly)
      16  4  crc32      u32, zlib.crc32 of header[0:16] followed by the body
    body
      varint spec_len, spec (ASCII canonical spec string)
      varint n_tensors
      n_tensors x record
    record
      varint shared     bytes of the name equal to the previous record's name (front coding)
      varint suffix_len, suffix; name = previous[:shared] + suffix, valid UTF-8, unique
      u8     dtype_ndim: bits 7-6 source dtype (0 f32, 1 f16, 2 bf16, 3 f64), bits 5-0 ndim
      ndim x varint dim (ndim <= 32)
      u8     coding: bits 7-6 value codec (0 f32, 1 f16, 2 bf16, 3 quantized),
                     bits 5-2 bits (1..8 when quantized, else 0),
                     bit 1 entropy-coded values (quantized only; see entropy.py), bit 0 zstd
      varint block (quantized: 0 = one scale per tensor; else 0)
      u8     position: bits 7-6 codec (0 all, 1 bitmap, 2 golomb-rice, 3 low-rank factors),
                       bits 5-0 rice param (golomb) or rank (low-rank)
      varint count (kept values)
      varint positions_len, varint scales_len, varint values_len (raw section lengths)
      [varint stored_len, when zstd]
      data: positions | scales | values, or one zstd frame of that concatenation

Schema-bound payloads (flag bit 0) leave out what the receiver already knows -- it holds the
model the update is for -- and everything their own fields imply::

    body
      varint spec_len, spec
      16 bytes schema digest: blake2b-128 of the tensors' sorted (name, shape) list
      u8     source dtype of every tensor (0 f32, 1 f16, 2 bf16, 3 f64)
      one compact record per schema tensor, in sorted-name order
    compact record
      u8     coding (as above)
      [varint block, when quantized]
      u8     position (as above)
      [varint count, unless position codec 0 (count = numel) or 3 (count from the rank)]
      [varint positions_len, when golomb-rice]  (bitmap/all/low-rank: implied)
      [varint values_len, when entropy-coded]   (otherwise implied by count and codec)
      [varint stored_len, when zstd]            (scales_len is always implied)
      data as above

The receiver passes its schema (name -> shape); another digest is rejected before any record
is read. On the digits CNN this cuts a record's metadata from ~25 to 2-7 bytes.

Spec-implied payloads (flag bit 1, only with bit 0) also leave out what the receiver asked
for: the spec string (``varint spec_len, spec`` is absent) and the quantizer's block in
every compact record (it is the spec's). The receiver passes the spec it expects; without
one such a payload cannot be read. fedslim's uplink uses it (the server chose the spec).

The reader (:mod:`fedslim.compression.wire_read`) checks every field before it slices or
allocates anything sized by the payload. No pickle, no eval: the format is plain bytes.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from types import ModuleType
from typing import Any

import numpy as np

from fedslim.compression.bitpack import packed_size
from fedslim.compression.positions import PositionCodec
from fedslim.compression.quantize import ValueCodec, n_scales
from fedslim.errors import EncodeError

MAGIC = b"FSLM"
VERSION = 3  # 2: small entropy-coded records carry a model; 3: a 16-byte schema digest
WIRE_STYPE = f"fedslim.wire/v{VERSION}"
HEADER = struct.Struct("<4sHHQI")
MAX_NDIM = 32
MAX_NAME_BYTES = 1 << 16
SCHEMA_BOUND = 1
"""Header flag: records carry no names, dtypes or shapes (see the module docstring)."""
SPEC_IMPLIED = 2
"""Header flag (with SCHEMA_BOUND): no spec string, no quantizer block per record."""
DIGEST_BYTES = 16
"""blake2b-128: a payload for one set of shapes cannot be made to pass under another (a
4-byte digest collided in ~1 s of hashing)."""
ZSTD_MIN_GAIN = 1 / 64
"""zstd output is kept only if it saves at least this fraction of a record's data."""


class SourceDtype(IntEnum):
    F32 = 0
    F16 = 1
    BF16 = 2
    F64 = 3


class Packing(IntEnum):
    RAW = 0
    ZSTD = 1


@dataclass(frozen=True)
class TensorRecord:
    """One tensor on the wire; sections are raw (uncompressed) uint8 arrays."""

    name: str
    source_dtype: SourceDtype
    shape: tuple[int, ...]
    value_codec: ValueCodec
    bits: int
    block: int
    position_codec: PositionCodec
    rice_param: int
    count: int
    positions: np.ndarray
    scales: np.ndarray
    values: np.ndarray
    packing: Packing = Packing.RAW
    entropy: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def schema_digest(schema: Mapping[str, tuple[int, ...]]) -> bytes:
    """16 bytes identifying a set of tensors: blake2b over the sorted (name, shape) list."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=b"fedslim-schema")
    for name in sorted(schema):
        shape = schema[name]
        raw = name.encode("utf-8")
        h.update(_varint(len(raw)) + raw + _varint(len(shape)))
        for d in shape:
            h.update(_varint(int(d)))
    return h.digest()


def _implied_lengths(value_codec: int, bits: int, block: int, pos_codec: int, count: int,
                     numel: int) -> tuple[int | None, int, int]:
    """(positions, scales, values) section lengths a compact record leaves out; positions is
    None for golomb-rice (always sent), values is what it is when not entropy-coded."""
    quant = value_codec == ValueCodec.QUANT
    positions = {PositionCodec.ALL: 0, PositionCodec.LOWRANK: 0,
                 PositionCodec.BITMAP: packed_size(numel, 1)}.get(PositionCodec(pos_codec))
    scales = 4 * n_scales(count, block) if quant else 0
    values = (packed_size(count, bits) if quant
              else count * (4 if value_codec == ValueCodec.F32 else 2))
    return positions, scales, values


def _zstd() -> ModuleType | None:
    try:
        import zstandard
    except ImportError:  # the GPU box may have only torch
        return None
    return zstandard


def _pack(rec: TensorRecord, compressor: Any) -> tuple[list[bytes | memoryview], Packing]:
    """A record's three sections as stored: raw, or one zstd frame where that pays."""
    sections = [rec.positions, rec.scales, rec.values]
    raw_len = sum(s.size for s in sections)
    if compressor is not None and raw_len >= 64:
        packed = compressor.compress(b"".join(s.data for s in sections))
        if len(packed) <= raw_len * (1 - ZSTD_MIN_GAIN):
            return [packed], Packing.ZSTD
    return [s.data for s in sections], Packing.RAW


def _codes(rec: TensorRecord, packing: Packing) -> tuple[int, int]:
    """The record's coding and position bytes."""
    coding = rec.value_codec << 6 | rec.bits << 2 | int(rec.entropy) << 1 | packing
    return coding, rec.position_codec << 6 | rec.rice_param


def _compact_head(rec: TensorRecord, packing: Packing, spec_implied: bool) -> bytearray:
    """A schema-bound record's fields: only what its shape and codecs do not imply."""
    coding, position = _codes(rec, packing)
    head = bytearray([coding])
    if rec.value_codec is ValueCodec.QUANT and not spec_implied:
        head += _varint(rec.block)
    head.append(position)
    if rec.position_codec not in (PositionCodec.ALL, PositionCodec.LOWRANK):
        head += _varint(rec.count)
    if rec.position_codec is PositionCodec.RICE:
        head += _varint(rec.positions.size)
    if rec.entropy:
        head += _varint(rec.values.size)
    return head


def _full_head(rec: TensorRecord, packing: Packing, previous: bytes) -> bytearray:
    """A self-describing record's fields: front-coded name, dtype, shape, every length."""
    name = rec.name.encode("utf-8")
    coding, position = _codes(rec, packing)
    shared = _common_prefix(previous, name)
    head = bytearray(_varint(shared) + _varint(len(name) - shared) + name[shared:])
    head.append(rec.source_dtype << 6 | len(rec.shape))
    for d in rec.shape:
        head += _varint(d)
    head.append(coding)
    head += _varint(rec.block)
    head.append(position)
    head += _varint(rec.count)
    for section in (rec.positions, rec.scales, rec.values):
        head += _varint(section.size)
    return head


def write_payload(spec: str, records: list[TensorRecord], zstd_level: int | None,
                  schema_bound: bool = False, spec_implied: bool = False) -> bytes:
    """Serialise records under ``spec``; with ``zstd_level``, compress where it pays.

    ``schema_bound``: compact records in sorted-name order after the schema digest (all
    records must share one source dtype); the receiver must pass the same schema.
    ``spec_implied`` (schema-bound only): no spec string and no quantizer block (all
    quantized records must share the spec's); the receiver must pass the spec."""
    if spec_implied and not schema_bound:
        raise EncodeError("a spec-implied payload must be schema-bound")
    blocks = {r.block for r in records if r.value_codec is ValueCodec.QUANT}
    if spec_implied and len(blocks) > 1:
        raise EncodeError(f"a spec-implied payload needs one quantizer block, got "
                          f"{sorted(blocks)}")
    compressor = None
    if zstd_level is not None:
        zstandard = _zstd()
        if zstandard is None:
            raise EncodeError("spec asks for zstd but the 'zstandard' package is not installed")
        compressor = zstandard.ZstdCompressor(level=zstd_level)
    spec_bytes = spec.encode("ascii")
    parts: list[bytes | memoryview] = ([] if spec_implied
                                       else [_varint(len(spec_bytes)), spec_bytes])
    if schema_bound:
        dtypes = {rec.source_dtype for rec in records}
        if len(dtypes) > 1:
            raise EncodeError(f"a schema-bound payload needs one source dtype, got "
                              f"{sorted(d.name for d in dtypes)}")
        records = sorted(records, key=lambda r: r.name)
        parts.append(schema_digest({r.name: r.shape for r in records}))
        parts.append(bytes([dtypes.pop() if dtypes else 0]))
    else:
        parts.append(_varint(len(records)))
    previous = b""
    for rec in records:
        name = rec.name.encode("utf-8")
        if len(name) > MAX_NAME_BYTES or len(rec.shape) > MAX_NDIM:
            raise EncodeError(f"tensor {rec.name[:80]!r}: name over {MAX_NAME_BYTES} bytes "
                              f"or more than {MAX_NDIM} dimensions")
        stored, packing = _pack(rec, compressor)
        if schema_bound:
            head = _compact_head(rec, packing, spec_implied)
        else:
            head = _full_head(rec, packing, previous)
            previous = name
        if packing is Packing.ZSTD:
            head += _varint(len(stored[0]))
        parts.append(bytes(head))
        parts.extend(stored)
    body_len = sum(len(part) for part in parts)
    flags = (SCHEMA_BOUND if schema_bound else 0) | (SPEC_IMPLIED if spec_implied else 0)
    head16 = HEADER.pack(MAGIC, VERSION, flags, body_len, 0)[:16]
    crc = zlib.crc32(head16)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return b"".join([head16, struct.pack("<I", crc), *parts])  # the only copy of the data
