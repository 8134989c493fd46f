"""Malformed payloads raise DecodeError -- only DecodeError, quickly, without big allocations.

Three layers: (1) every truncation and random bit flips of valid payloads (framing and the
checksum catch these); (2) mutations with a *recomputed* checksum, so field validation itself
is exercised; (3) hand-made records, one per documented error, checking the message names it.
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedslim.compression import DecodedUpdate, decode_update, encode_update
from fedslim.compression.positions import PositionCodec, _encode_rice, decode_positions
from fedslim.compression.wire import HEADER, VERSION, TensorRecord, write_payload
from fedslim.compression.wire_read import read_payload
from fedslim.errors import DecodeError

SPECS = ["none", "q:8", "topk:0.1|q:4|pass:0", "q:4|ans|pass:0", "topk:0.5|q:3|ans|pass:0",
         "lowrank:2|q:4|pass:0",
         "topk:0.3|q:3,block=4|bitmap|pass:0",
         "topk:0.2|sign|golomb|pass:8", "topk:0.5|fp16|zstd|pass:0",
         "topk:0.2,scope=global,mode=sampled|bf16|pass:0"]


def small_update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(4, 3, 3, generator=g),
            "conv.bias": torch.randn(4, generator=g) * 1e-3,
            "fc": torch.randn(40, generator=g).repeat(2)}  # repeats: zstd has something to do


def with_crc(body: bytes, version: int = VERSION, flags: int = 0) -> bytes:
    """A framed payload around ``body`` with a correct length and checksum."""
    head16 = HEADER.pack(b"FSLM", version, flags, len(body), 0)[:16]
    return head16 + struct.pack("<I", zlib.crc32(body, zlib.crc32(head16))) + body


def body_of(payload: bytes) -> bytes:
    return payload[HEADER.size:]


def rebuild(payload: bytes, spec: str | None = None, **changes: object) -> bytes:
    """Re-serialise a valid payload with fields of its first record replaced."""
    text, records = read_payload(payload, 1 << 28)
    records[0] = replace(records[0], **changes)
    return write_payload(spec if spec is not None else text, records, None)


@pytest.mark.parametrize("text", SPECS)
def test_every_truncation_is_rejected(text: str) -> None:
    payload = encode_update(small_update(), text)
    for cut in range(len(payload)):
        with pytest.raises(DecodeError):
            decode_update(payload[:cut])


@pytest.mark.parametrize("text", SPECS)
def test_random_bit_flips_are_rejected(text: str) -> None:
    payload = bytearray(encode_update(small_update(), text))
    rng = np.random.default_rng(0)
    for bit in rng.integers(0, 8 * len(payload), 60):
        flipped = bytearray(payload)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecodeError):
            decode_update(bytes(flipped))


def _decode_or_reject(payload: bytes, max_elements: int = 1 << 20) -> DecodedUpdate | None:
    try:
        out = decode_update(payload, max_elements=max_elements)
    except DecodeError:
        return None
    assert sum(t.numel() for t in out.tensors.values()) <= max_elements
    assert all(bool(torch.isfinite(t).all()) for t in out.tensors.values())
    return out


@pytest.mark.parametrize("text", SPECS)
def test_mutations_with_valid_checksum_raise_only_decode_error(text: str) -> None:
    """Corrupt 1-3 body bytes, fix the checksum: decode succeeds or raises DecodeError."""
    body = bytearray(body_of(encode_update(small_update(), text)))
    rng = np.random.default_rng(1)
    tracemalloc.start()
    try:
        for _ in range(150):
            mutated = bytearray(body)
            for pos in rng.integers(0, len(body), rng.integers(1, 4)):
                mutated[pos] = int(rng.integers(0, 256))
            _decode_or_reject(with_crc(bytes(mutated)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"decoder allocated {peak} bytes for a ~1 kB payload"


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), framed=st.booleans())
def test_arbitrary_bytes_raise_decode_error(data: bytes, framed: bool) -> None:
    _decode_or_reject(with_crc(data) if framed else data)


@settings(max_examples=100, deadline=2000)
@given(data=st.binary(max_size=64), count=st.integers(0, 40), numel=st.integers(0, 300),
       codec=st.sampled_from([PositionCodec.BITMAP, PositionCodec.RICE]), r=st.integers(0, 9))
def test_any_decodable_positions_are_sorted_unique_and_in_range(
        data: bytes, count: int, numel: int, codec: PositionCodec, r: int) -> None:
    """Unsorted or duplicated indices cannot even be expressed: whatever decodes is valid."""
    try:
        idx = decode_positions(codec, r, np.frombuffer(data, np.uint8), count, numel, "t")
    except DecodeError:
        return
    assert idx is not None and idx.size == count
    assert np.all(np.diff(idx) > 0) and (count == 0 or (idx[0] >= 0 and idx[-1] < numel))


# -- one test per documented error -----------------------------------------------------------
VALID = encode_update({"w": torch.linspace(-1, 1, 100)}, "topk:k=3|q:4|golomb|pass:0")


def _corrupt_header(offset: int, value: bytes) -> bytes:
    raw = bytearray(VALID)
    raw[offset:offset + len(value)] = value
    return bytes(raw)


def _record(**kw: object) -> TensorRecord:
    base = dict(name="w", source_dtype=0, shape=(4,), value_codec=0, bits=0, block=0,
                position_codec=PositionCodec.ALL, rice_param=0, count=4,
                positions=np.zeros(0, np.uint8), scales=np.zeros(0, np.uint8),
                values=np.zeros(4, "<f4").view(np.uint8))
    base.update(kw)
    return TensorRecord(**base)  # type: ignore[arg-type]


def _rice(idx: list[int], r: int) -> np.ndarray:
    return _encode_rice(np.diff(np.array(idx), prepend=-1) - 1, r).data


NAN4 = np.array([np.nan], "<f4").view(np.uint8)
CASES = {
    "bad magic": _corrupt_header(0, b"XXXX"),
    "unsupported wire version": _corrupt_header(4, b"\x01\x00"),
    "unknown flags": _corrupt_header(6, b"\x02\x00"),
    "shorter than the 20-byte header": VALID[:10],
    "truncated: header says": VALID[:-1],
    "trailing bytes: header says": VALID + b"\x00",
    "checksum mismatch": VALID[:-1] + bytes([VALID[-1] ^ 1]),
    "trailing bytes after the last tensor": with_crc(body_of(VALID) + b"\x00"),
    "over the limit": rebuild(VALID, shape=(1 << 40,)),
    "elements, over the limit": rebuild(VALID, shape=(1 << 62, 1 << 62, 4)),
    "golomb gap exceeds": rebuild(VALID, positions=_rice([0, 1, 110], 2), rice_param=2),
    "golomb indices run past": rebuild(VALID, positions=_rice([0, 5, 120], 7), rice_param=7),
    "golomb unary stream has": rebuild(VALID, positions=_rice([0, 5, 9, 12], 0), rice_param=0),
    "trailing bytes after the golomb unary stream": rebuild(
        VALID, positions=np.concatenate([_rice([0, 5, 9], 2), [0]]).astype(np.uint8),
        rice_param=2),
    "scales must be finite": rebuild(VALID, scales=NAN4),
    "scales must be finite and >= 0": rebuild(VALID, scales=np.array([-1.0], "<f4").view(np.uint8)),
    "duplicate tensor name": write_payload("none", [_record(), _record()], None),
    "values contain NaN or Inf": write_payload("none", [_record(values=np.concatenate(
        [NAN4, np.zeros(12, np.uint8)]))], None),
    "not canonical": write_payload("fp32", [_record()], None),
    "invalid spec": write_payload("q:99", [_record()], None),
    "does not match the payload's spec": rebuild(VALID, "topk:k=3|q:5|golomb|pass:0"),
    "exactly 2 kept values": write_payload("topk:k=2|pass:0", [_record()], None),
    "low-rank factors of a matrix-shaped tensor": write_payload(
        "none", [_record(position_codec=3)], None),
    "entropy-coded values section": write_payload("none", [_record(entropy=True)], None),
    "shares 3 bytes with a previous name of 0": with_crc(b"\x04none\x01\x03\x01w"),
    "not valid UTF-8": with_crc(b"\x04none\x01\x00\x02\xff\xfe"),
    "non-minimal varint": with_crc(b"\x84\x00none\x00"),
    "ndim 40 > 32": with_crc(b"\x04none\x01\x00\x01w\x28"),
    "count 9 exceeds": write_payload("none", [_record(count=9)], None),
    "values section is": write_payload("none", [_record(values=np.zeros(3, np.uint8))], None),
    "positions section is": rebuild(VALID, positions=np.zeros(40, np.uint8)),
    "bitmap marks": write_payload("topk:0.5|bitmap|pass:0", [_record(
        position_codec=PositionCodec.BITMAP, count=2, positions=np.array([0xE0], np.uint8),
        values=np.zeros(8, np.uint8))], None),
    "bitmap padding bits": write_payload("topk:0.5|bitmap|pass:0", [_record(
        position_codec=PositionCodec.BITMAP, count=2, positions=np.array([0xC1], np.uint8),
        values=np.zeros(8, np.uint8))], None),
    "padding bits of the last byte": rebuild(VALID, values=np.array([0x12, 0x3F], np.uint8)),
    "tensor count": with_crc(b"\x04none\xff\xff\x03"),
    "payload must be bytes-like": "not bytes",  # type: ignore[dict-item]
}


@pytest.mark.parametrize("message", list(CASES))
def test_each_documented_error(message: str) -> None:
    with pytest.raises(DecodeError, match=message.replace("(", r"\(")):
        decode_update(CASES[message], max_elements=1 << 20)  # type: ignore[arg-type]


def test_valid_case_base_decodes() -> None:
    assert torch.count_nonzero(decode_update(VALID).tensors["w"]) == 3


def test_zstd_frames_are_checked() -> None:
    payload = encode_update({"w": torch.zeros(2000)}, "fp16|zstd")
    text, records = read_payload(payload, 1 << 28)
    assert records[0].packing.name == "ZSTD"
    body = bytearray(body_of(payload))
    body += b"junk"  # extra bytes inside the frame region: lengths no longer agree
    with pytest.raises(DecodeError):
        decode_update(with_crc(bytes(body)))
    no_zstd = write_payload("fp16", records, None)  # raw packing is fine without zstd
    assert torch.equal(decode_update(no_zstd).tensors["w"], torch.zeros(2000))


def test_huge_claims_fail_fast_before_allocating() -> None:
    claim = rebuild(VALID, shape=(1 << 27,))  # 0.5 GB of float32 if believed
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="over the limit"):
            decode_update(claim, max_elements=1 << 20)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
