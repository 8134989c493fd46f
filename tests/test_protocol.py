"""Headers of the compression layer: compact binary round trips, and untrusted bytes
either parse or raise UpdateRejected (never anything else)."""

import struct
from dataclasses import replace

import pytest
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.errors import UpdateRejected
from fedslim.protocol import HEADER_KEY, KEY_BASE, DownlinkHeader, UplinkHeader

UP = UplinkHeader(stream=5, version=3, server_round=2, global_crc=123, arrays_key="arrays",
                  encode_seconds=0.012345, decode_seconds=0.0042)
DOWN = DownlinkHeader(stream=5, version=3, base=-1, arrays_key="arrays", uplink="topk:0.01|q:4",
                      error_feedback=True, keep=True, server_round=2, seed=42, init_crc=7)


def test_headers_round_trip_and_are_small():
    up, used = UplinkHeader.unpack(UP.pack() + b"payload", "n")
    assert used == len(UP.pack()) and up == replace(UP, encode_seconds=0.012345)
    assert UplinkHeader.from_record(UP.to_record(), "n") == UP
    assert DownlinkHeader.from_record(DOWN.to_record()) == DOWN
    assert len(UP.pack()) <= 40 and len(DOWN.pack()) <= 72


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=80), flips=st.lists(st.tuples(st.integers(0, 79),
                                                             st.integers(0, 255)),
                                                   max_size=6))
def test_any_bytes_parse_or_are_rejected_by_type(data, flips):
    for packed, parse in ((UP.pack(), lambda b: UplinkHeader.unpack(b, "node 9")),
                          (DOWN.pack(), lambda b: DownlinkHeader.unpack(b, "node 9"))):
        for candidate in (data, _flip(packed, flips), packed[:len(data) % (len(packed) + 1)]):
            try:
                parse(candidate)
            except UpdateRejected as exc:
                assert "node 9" in str(exc)


def _flip(packed: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(packed)
    for i, v in flips:
        if i < len(out):
            out[i] = v
    return bytes(out)


def test_malformed_headers_name_what_is_wrong():
    with pytest.raises(UpdateRejected, match="not a fedslim v2 uplink header"):
        UplinkHeader.unpack(b"XXXX" + UP.pack()[4:], "n")
    with pytest.raises(UpdateRejected, match="need"):
        UplinkHeader.unpack(UP.pack()[:10], "n")
    with pytest.raises(UpdateRejected, match="trailing"):
        UplinkHeader.from_record(ConfigRecord({HEADER_KEY: UP.pack() + b"x"}), "n")
    with pytest.raises(UpdateRejected, match="one bytes value"):
        UplinkHeader.from_record(ConfigRecord({HEADER_KEY: 3}), "n")
    bad_base = bytearray(DOWN.pack())
    struct.pack_into("<i", bad_base, 13, -5)  # base field: below KEY_BASE
    with pytest.raises(UpdateRejected, match="downlink"):
        DownlinkHeader.unpack(bytes(bad_base))


def test_keyframe_base_needs_the_round0_crc():
    key = replace(DOWN, base=KEY_BASE)
    assert DownlinkHeader.unpack(key.pack()) == key
    with pytest.raises(UpdateRejected, match="not a fedslim v1 downlink header"):
        DownlinkHeader.unpack(replace(key, init_crc=0).pack())
