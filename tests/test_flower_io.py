"""Payloads inside Flower records, bit-identical delta application, message byte counts."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_apply_delta_is_plain_addition_into_fresh_tensors():
    """Huge-page output buffers change nothing: the bits of ``prev + delta``, new tensors,
    inputs untouched, entries without a delta copied, other dtypes kept."""
    g = torch.Generator().manual_seed(1)
    prev = {"w": torch.randn(3000, 7, generator=g), "b": torch.randn(7, generator=g),
            "n": torch.arange(5), "h": torch.randn(9, generator=g).half()}
    delta = {"w": torch.randn(3000, 7, generator=g), "h": torch.randn(9, generator=g)}
    before = {k: v.clone() for k, v in prev.items()}
    out = apply_delta(prev, delta)
    assert torch.equal(out["w"], prev["w"] + delta["w"])
    assert torch.equal(out["h"], prev["h"] + delta["h"].half()) and out["h"].dtype == torch.half
    for k in prev:
        assert torch.equal(prev[k], before[k]) and out[k].data_ptr() != prev[k].data_ptr()
        assert out[k].shape == prev[k].shape and out[k].is_contiguous()
    assert torch.equal(out["n"], prev["n"]) and torch.equal(out["b"], prev["b"])


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


# ----------------------------------------------------------------- compact train replies
def _reply_content(metrics: dict | None = None, name: str = "metrics") -> RecordDict:
    return RecordDict({name: MetricRecord(metrics if metrics is not None else {
        "num-examples": 130, "train-loss": 0.25, "partition-id": 3, "hist": [1.5, 2.5]})})


def test_fold_then_unfold_restores_the_usual_records_in_fewer_bytes() -> None:
    from fedslim.flower_io import content_bytes, fold_reply, payload_record, unfold_reply
    from fedslim.protocol import PAYLOAD

    data = bytes(range(256)) * 3
    for name in ("metrics", "my-metrics"):
        classic = _reply_content(name=name)
        classic[PAYLOAD] = payload_record(data)
        folded = _reply_content(name=name)
        assert fold_reply(folded, data)
        assert list(folded.config_records) == [PAYLOAD] and not folded.metric_records
        assert content_bytes(classic) - content_bytes(folded) >= 400  # ~0.47 kB measured
        unfold_reply(folded, "node 1")
        assert bytes(folded.array_records[PAYLOAD]["fedslim"].data) == data
        assert dict(folded.metric_records[name]) == dict(classic.metric_records[name])


def test_fold_declines_what_it_cannot_carry() -> None:
    from fedslim.flower_io import COMPACT_MAX, fold_reply

    assert not fold_reply(_reply_content(), bytes(COMPACT_MAX + 1))  # big: array form
    two = _reply_content()
    two["other"] = _reply_content()["metrics"]
    assert not fold_reply(two, b"x")
    reserved = _reply_content({"num-examples": 1, "fedslim.h": 2})
    assert not fold_reply(reserved, b"x")
    assert list(reserved.metric_records) == ["metrics"]  # untouched


@pytest.mark.parametrize("entries,fragment", [
    ({"fedslim.h": "text"}, "fedslim.h"),
    ({"fedslim.h": b""}, "fedslim.h"),
    ({"fedslim.h": bytes((1 << 16) + 1)}, "fedslim.h"),
    ({"fedslim.h": b"x", "fedslim.m": "fedslim.payload"}, "names its metrics"),
    ({"fedslim.h": b"x", "fedslim.m": 7}, "names its metrics"),
    ({"fedslim.h": b"x", "loss": "low"}, "expected numbers"),
    ({"fedslim.h": b"x", "loss": True}, "expected numbers"),
    ({"fedslim.h": b"x", "loss": ["a"]}, "expected numbers"),
    ({"fedslim.h": b"x", "fedslim.z": 1}, "unknown entry"),
    ({"fedslim.h": b"x", **{f"m{i}": i for i in range(1100)}}, "at most 1024"),
])
def test_unfold_rejects_hostile_compact_replies(entries: dict, fragment: str) -> None:
    from flwr.app import ConfigRecord

    from fedslim.errors import UpdateRejected
    from fedslim.flower_io import unfold_reply
    from fedslim.protocol import PAYLOAD

    content = RecordDict({PAYLOAD: ConfigRecord(entries)})
    with pytest.raises(UpdateRejected, match=fragment):
        unfold_reply(content, "node 9")
    both = _reply_content()
    both[PAYLOAD] = ConfigRecord({"fedslim.h": b"x"})
    with pytest.raises(UpdateRejected, match="also carries a MetricRecord"):
        unfold_reply(both, "node 9")


@settings(max_examples=50, deadline=None)
@given(metrics=st.dictionaries(
    st.text(alphabet="abcxyz-_.", min_size=1, max_size=10).filter(
        lambda k: not k.startswith("fedslim.")),
    st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False),
              st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=5)),
    min_size=1, max_size=8),
    data=st.binary(min_size=1, max_size=300))
def test_any_metrics_round_trip_through_the_compact_form(metrics: dict, data: bytes) -> None:
    from fedslim.flower_io import fold_reply, unfold_reply
    from fedslim.protocol import PAYLOAD

    content = _reply_content(metrics)
    assert fold_reply(content, data)
    unfold_reply(content, "node 1")
    assert dict(content.metric_records["metrics"]) == metrics
    assert bytes(content.array_records[PAYLOAD]["fedslim"].data) == data
