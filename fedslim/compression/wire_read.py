"""Reading the fedslim wire format (:mod:`fedslim.compression.wire`): every field bounds-checked.

The reader checks the magic, version, flags and body length first, then the checksum, then
every field in order, comparing each length with what the record's count/shape/codec imply
*before* slicing or allocating anything sized by the payload; a zstd frame is only inflated
to the exact size those checks allowed. Every failure is a :class:`DecodeError` naming the
field, the tensor and the byte offset.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from enum import IntEnum

import numpy as np

from fedslim.compression.bitpack import packed_size
from fedslim.compression.lowrank import factor_count
from fedslim.compression.positions import PositionCodec, rice_size_range
from fedslim.compression.quantize import ValueCodec, n_scales
from fedslim.compression.wire import (
    DIGEST_BYTES,
    HEADER,
    MAGIC,
    MAX_NAME_BYTES,
    MAX_NDIM,
    SCHEMA_BOUND,
    SPEC_IMPLIED,
    VERSION,
    Packing,
    SourceDtype,
    TensorRecord,
    _implied_lengths,
    _zstd,
    schema_digest,
)
from fedslim.errors import DecodeError


class _Reader:
    """Bounds-checked cursor over the body; every read names what it was reading."""

    def __init__(self, body: memoryview, base: int) -> None:
        self.buf, self.pos, self.base, self.where = body, 0, base, "payload"

    def fail(self, msg: str) -> DecodeError:
        return DecodeError(f"{self.where}: {msg} (at byte {self.base + self.pos})")

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.buf) - self.pos:
            raise self.fail(f"truncated {what}: need {n} bytes, {len(self.buf) - self.pos} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def varint(self, what: str) -> int:
        value = 0
        for i in range(10):
            byte = self.u8(what)
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise self.fail(f"non-minimal varint in {what}")
                if value >= 1 << 64:
                    raise self.fail(f"{what} does not fit in 64 bits")
                return value
        raise self.fail(f"varint for {what} is longer than 10 bytes")


def read_header(payload: bytes | bytearray | memoryview) -> tuple[memoryview, int]:
    """Check the 20-byte header and checksum; return the body and the flags."""
    view = memoryview(payload).cast("B")
    if len(view) < HEADER.size:
        raise DecodeError(f"payload is {len(view)} bytes, shorter than the "
                          f"{HEADER.size}-byte header")
    magic, version, flags, body_len, crc = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise DecodeError(f"bad magic {bytes(magic)!r} at byte 0, expected {MAGIC!r} "
                          "(not a fedslim payload)")
    if version != VERSION:
        raise DecodeError(f"unsupported wire version {version} at byte 4; this decoder "
                          f"reads version {VERSION}")
    if flags & ~(SCHEMA_BOUND | SPEC_IMPLIED) or flags == SPEC_IMPLIED:
        raise DecodeError(f"unknown flags 0x{flags:04x} at byte 6")
    if body_len != len(view) - HEADER.size:
        kind = "truncated" if body_len > len(view) - HEADER.size else "trailing bytes"
        raise DecodeError(f"{kind}: header says the body is {body_len} bytes, "
                          f"payload has {len(view) - HEADER.size} after the header")
    body = view[HEADER.size:]
    actual = zlib.crc32(body, zlib.crc32(view[:16]))
    if actual != crc:
        raise DecodeError(f"checksum mismatch: header crc32 0x{crc:08x}, body 0x{actual:08x}")
    return body, flags


def read_payload(payload: bytes | bytearray | memoryview, max_elements: int,
                 expected_spec: str | None = None,
                 schema: Mapping[str, tuple[int, ...]] | None = None,
                 block: int = 0) -> tuple[str, list[TensorRecord]]:
    """Parse and structurally validate a payload into its spec string and records.

    ``expected_spec`` (canonical text) and ``schema`` (name -> shape) make the reader
    reject a payload of another pipeline, or with a tensor the receiver does not have or
    of another shape, as soon as the spec string or that record's header is read --
    before anything sized by the payload is sliced, inflated or allocated. A schema-bound
    payload cannot be read without ``schema``; its digest must match. A spec-implied one
    cannot be read without ``expected_spec`` and that spec's quantizer ``block``.
    """
    body, flags = read_header(payload)
    rd = _Reader(body, HEADER.size)
    if flags & SPEC_IMPLIED:
        if expected_spec is None:
            raise rd.fail("the payload leaves its spec out: the receiver must pass the spec "
                          "it asked for")
        spec = expected_spec
    else:
        spec_bytes = rd.take(rd.varint("spec length"), "spec string")
        try:
            spec = bytes(spec_bytes).decode("ascii")
        except UnicodeDecodeError:
            raise rd.fail("spec string is not ASCII") from None
        if expected_spec is not None and spec != expected_spec:
            raise rd.fail(f"payload uses pipeline {spec[:80]!r}, expected {expected_spec!r}")
    if flags & SCHEMA_BOUND:
        implied = block if flags & SPEC_IMPLIED else None
        return spec, _read_bound(rd, max_elements, schema, implied)
    n_tensors = rd.varint("tensor count")
    if n_tensors > len(rd.buf) - rd.pos:  # each record is at least a few bytes
        raise rd.fail(f"tensor count {n_tensors} exceeds the bytes left")
    records: list[TensorRecord] = []
    names: set[str] = set()
    budget, previous = max_elements, b""
    for i in range(n_tensors):
        rd.where = f"tensor #{i}"
        rec, previous = _read_record(rd, budget, previous, schema)
        if rec.name in names:
            raise rd.fail(f"duplicate tensor name {rec.name!r}")
        names.add(rec.name)
        budget -= rec.numel
        records.append(rec)
    rd.where = "payload"
    if rd.pos != len(rd.buf):
        raise rd.fail(f"{len(rd.buf) - rd.pos} trailing bytes after the last tensor")
    return spec, records


def _read_bound(rd: _Reader, max_elements: int, schema: Mapping[str, tuple[int, ...]] | None,
                implied_block: int | None = None) -> list[TensorRecord]:
    """The compact records of a schema-bound payload, names and shapes from ``schema``
    (and, spec-implied, every quantized record's block ``implied_block``)."""
    if schema is None:
        raise rd.fail("schema-bound payload (no tensor names or shapes): the receiver must "
                      "pass its schema")
    digest = bytes(rd.take(DIGEST_BYTES, "schema digest"))
    if digest != schema_digest(schema):
        raise rd.fail(f"payload was encoded for another set of tensors (schema digest "
                      f"{digest.hex()}, the receiver's is {schema_digest(schema).hex()})")
    source = rd.u8("source dtype")
    if source > max(SourceDtype):
        raise rd.fail(f"unknown source dtype {source}")
    records: list[TensorRecord] = []
    budget = max_elements
    for i, name in enumerate(sorted(schema)):
        shape = tuple(int(d) for d in schema[name])
        numel = 1
        for d in shape:
            numel *= d
        rd.where = f"tensor #{i} {name[:80]!r}"
        if numel > budget:
            raise rd.fail(f"shape {shape} has {numel} elements, over the limit "
                          f"({budget} left of max_elements)")
        budget -= numel
        coding = rd.u8("coding byte")
        quant = coding >> 6 == ValueCodec.QUANT
        block = 0 if not quant else (rd.varint("block") if implied_block is None
                                     else implied_block)
        position = rd.u8("position byte")
        pos_codec = _enum(rd, PositionCodec, position >> 6, "position codec")
        rice = position & 0x3F
        if pos_codec is PositionCodec.ALL:
            count = numel
        elif pos_codec is PositionCodec.LOWRANK:
            count = (factor_count(shape, numel, rice) if rice else None) or 0
        else:
            count = rd.varint("count")
        if count > numel:
            raise rd.fail(f"count {count} exceeds the {numel} elements of shape {shape}")
        positions, scales, values = _implied_lengths(coding >> 6, (coding >> 2) & 0xF, block,
                                                     pos_codec, count, numel)
        if positions is None:
            positions = rd.varint("positions length")
        if coding & 0b10:
            values = rd.varint("values length")
        rec = _record_body(rd, name, source, shape, numel, coding, block, position, count,
                           [positions, scales, values])
        records.append(rec)
    rd.where = "payload"
    if rd.pos != len(rd.buf):
        raise rd.fail(f"{len(rd.buf) - rd.pos} trailing bytes after the last tensor")
    return records


def _enum(rd: _Reader, cls: type[IntEnum], value: int, what: str) -> IntEnum:  # noqa: D103
    try:
        return cls(value)
    except ValueError:
        raise rd.fail(f"unknown {what} {value}") from None


def _read_name_shape(rd: _Reader, budget: int, previous: bytes,
                     schema: Mapping[str, tuple[int, ...]] | None
                     ) -> tuple[str, bytes, int, tuple[int, ...], int]:
    """Name (front-coded), source dtype and shape, checked against ``schema`` and the
    element budget; (name, raw name, source dtype, shape, numel)."""
    shared = rd.varint("shared name prefix")
    if shared > len(previous):
        raise rd.fail(f"name shares {shared} bytes with a previous name of {len(previous)}")
    raw_name = previous[:shared] + bytes(rd.take(rd.varint("name length"), "tensor name"))
    if len(raw_name) > MAX_NAME_BYTES:
        raise rd.fail(f"tensor name is over {MAX_NAME_BYTES} bytes")
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise rd.fail("tensor name is not valid UTF-8") from None
    rd.where = f"{rd.where} {name[:80]!r}"
    dtype_ndim = rd.u8("dtype/ndim byte")
    source, ndim = dtype_ndim >> 6, dtype_ndim & 0x3F
    if ndim > MAX_NDIM:
        raise rd.fail(f"ndim {ndim} > {MAX_NDIM}")
    shape = tuple(rd.varint("dimension") for _ in range(ndim))
    if schema is not None and schema.get(name) != shape:
        raise rd.fail(f"tensor of shape {shape} is not in the receiver's model (expected "
                      + (f"shape {schema[name]})" if name in schema else "one of its names)"))
    numel = 1
    for d in shape:  # python ints cannot overflow: <= 32 factors below 2**64
        numel *= d
    if numel > budget or any(d >= 1 << 63 for d in shape):
        raise rd.fail(f"shape {shape} has {numel} elements, over the limit "
                      f"({budget} left of max_elements)")
    return name, raw_name, source, shape, numel


def _read_record(rd: _Reader, budget: int, previous: bytes,
                 schema: Mapping[str, tuple[int, ...]] | None = None
                 ) -> tuple[TensorRecord, bytes]:
    name, raw_name, source, shape, numel = _read_name_shape(rd, budget, previous, schema)
    coding = rd.u8("coding byte")
    block = rd.varint("block")
    position = rd.u8("position byte")
    count = rd.varint("count")
    lengths = [rd.varint(f"{s} length") for s in ("positions", "scales", "values")]
    return _record_body(rd, name, source, shape, numel, coding, block, position, count,
                        lengths), raw_name


def _record_body(rd: _Reader, name: str, source: int, shape: tuple[int, ...], numel: int,
                 coding: int, block: int, position: int, count: int, lengths: list[int]
                 ) -> TensorRecord:
    """Check a record's fields against each other, then take (and inflate) its data."""
    value_codec, bits, packing = ValueCodec(coding >> 6), (coding >> 2) & 0xF, Packing(coding & 1)
    entropy = bool(coding & 0b10)
    pos_codec = _enum(rd, PositionCodec, position >> 6, "position codec")
    rice = position & 0x3F
    quant = value_codec is ValueCodec.QUANT
    if quant and not 1 <= bits <= 8:
        raise rd.fail(f"quantized values need 1..8 bits, got {bits}")
    if not quant and (bits or block):
        raise rd.fail(f"cast values must have bits=0 and block=0, got {bits} and {block}")
    if block > 1 << 24:
        raise rd.fail(f"block {block} exceeds {1 << 24}")
    if pos_codec not in (PositionCodec.RICE, PositionCodec.LOWRANK) and rice:
        raise rd.fail(f"rice parameter {rice} given for a non-golomb position code")
    if count > numel:
        raise rd.fail(f"count {count} exceeds the {numel} elements of shape {shape}")
    expected_values = (packed_size(count, bits) if quant
                       else count * (4 if value_codec is ValueCodec.F32 else 2))
    expected_scales = 4 * n_scales(count, block) if quant else 0
    if lengths[1] != expected_scales:
        raise rd.fail(f"scales section is {lengths[1]} bytes, expected {expected_scales}")
    if entropy:  # only ever used where it is smaller than the packed codes
        if not quant or count < 1 or not 0 < lengths[2] < expected_values:
            raise rd.fail(f"entropy-coded values section is {lengths[2]} bytes; it needs "
                          f"quantized values, count >= 1 and fewer than {expected_values} "
                          f"bytes (count {count}, {value_codec.name}, {bits} bits)")
    elif lengths[2] != expected_values:
        raise rd.fail(f"values section is {lengths[2]} bytes, expected {expected_values} "
                      f"for {count} values")
    _check_positions_length(rd, pos_codec, rice, count, numel, lengths[0], shape)
    raw_len = sum(lengths)
    if packing is Packing.ZSTD:
        stored = rd.take(rd.varint("zstd length"), "zstd frame")
        data = _inflate(rd, stored, raw_len)
    else:
        data = np.frombuffer(rd.take(raw_len, "tensor data"), dtype=np.uint8)
    cut = np.cumsum([0, *lengths])
    sections = [data[cut[j]:cut[j + 1]] for j in range(3)]
    return TensorRecord(name, SourceDtype(source), shape, value_codec, bits, block,
                        PositionCodec(pos_codec), rice, count, positions=sections[0],
                        scales=sections[1], values=sections[2], packing=packing,
                        entropy=entropy)


def _check_positions_length(rd: _Reader, codec: IntEnum, rice: int, count: int, numel: int,
                            length: int, shape: tuple[int, ...]) -> None:
    if codec is PositionCodec.LOWRANK:
        factors = factor_count(shape, numel, rice) if rice else None
        ok = length == 0 and factors is not None and count == factors
        expected = (f"no positions and {factors} factor values (rank {rice}, shape {shape})"
                    if factors is not None else f"low-rank factors of a matrix-shaped tensor "
                    f"smaller than it (rank {rice}, shape {shape})")
    elif codec is PositionCodec.ALL:
        ok, expected = length == 0 and count == numel, "0 bytes and count == numel"
    elif codec is PositionCodec.BITMAP:
        ok, expected = length == packed_size(numel, 1), f"{packed_size(numel, 1)} bytes"
    else:
        low, high = rice_size_range(count, numel, rice)
        ok, expected = low <= length <= high, f"{low}..{high} bytes"
    if not ok:
        raise rd.fail(f"positions section is {length} bytes (count {count}, numel {numel}); "
                      f"expected {expected}")


def _inflate(rd: _Reader, stored: memoryview, raw_len: int) -> np.ndarray:
    zstandard = _zstd()
    if zstandard is None:
        raise rd.fail("zstd-packed tensor but the 'zstandard' package is not installed")
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise rd.fail(f"bad zstd frame header: {exc}") from None
    if declared != raw_len:
        raise rd.fail(f"zstd frame declares {declared} bytes, sections need {raw_len}")
    inflater = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = inflater.decompress(stored)
    except zstandard.ZstdError as exc:
        raise rd.fail(f"corrupt zstd frame: {exc}") from None
    if not inflater.eof or inflater.unused_data or len(out) != raw_len:
        raise rd.fail(f"zstd frame is incomplete, has trailing bytes, or inflates to "
                      f"{len(out)} bytes instead of {raw_len}")
    return np.frombuffer(out, dtype=np.uint8)


__all__ = ["read_header", "read_payload"]
