"""Payloads inside Flower records, bit-identical delta application, message byte counts."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedslim.compression import WIRE_STYPE, decode_update, encode_update
from fedslim.errors import DecodeError
from fedslim.flower_io import (
    apply_delta,
    content_bytes,
    payload_from_record,
    payload_record,
    state_crc,
    state_record,
)


def test_payload_record_round_trip_and_checks():
    rec = payload_record(b"\x00\x01abc")
    assert payload_from_record(rec, "x") == b"\x00\x01abc"
    bad = ArrayRecord({"fedslim": Array(dtype="uint8", shape=(1,), stype="numpy.ndarray",
                                        data=b"\x00")})
    with pytest.raises(DecodeError, match="stype"):
        payload_from_record(bad, "node 3")
    with pytest.raises(DecodeError, match="one array"):
        payload_from_record(ArrayRecord({"a": Array(np.zeros(1))}), "node 3")


def test_server_and_client_reconstruct_bit_identical_globals():
    """The downlink path: server encodes a delta, both sides apply the decoded bytes."""
    torch.manual_seed(0)
    prev = {"w": torch.randn(50, 20), "b": torch.randn(20)}
    target = {k: v + 0.01 * torch.randn_like(v) for k, v in prev.items()}
    wanted = {k: target[k] - prev[k] for k in prev}
    payload, sent = encode_update(wanted, "topk:0.1|q:8,round=nearest",
                                  return_reconstruction=True)
    server = apply_delta(prev, sent)
    client = apply_delta({k: v.clone() for k, v in prev.items()},
                         decode_update(bytes(payload_record(payload)["fedslim"].data)).tensors)
    for k in prev:
        assert torch.equal(server[k], client[k]), k
    assert state_crc(server) == state_crc(client)


def test_state_crc_sees_a_one_ulp_change():
    s = {"w": torch.ones(4)}
    t = {"w": torch.nextafter(torch.ones(4), torch.full((4,), 2.0))}
    assert state_crc(s) != state_crc(t)


def test_content_bytes_reflects_payload_size():
    small = content_bytes(RecordDict({"p": payload_record(b"x" * 100)}))
    big = content_bytes(RecordDict({"p": payload_record(b"y" * 10_000)}))
    assert 9_900 <= big - small <= 10_000
    dense = content_bytes(RecordDict({"a": state_record({"w": torch.randn(1000)}),
                                      "m": MetricRecord({"x": 1.0})}))
    assert dense > 4000  # 1000 float32 values are serialized, plus headers
    assert payload_record(b"x").get("fedslim").stype == WIRE_STYPE
