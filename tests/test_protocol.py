"""Headers of the compression layer: round trips, and untrusted values rejected by type."""

import pytest
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.errors import UpdateRejected
from fedslim.protocol import DownlinkHeader, UplinkHeader

UP = UplinkHeader(stream=5, version=3, server_round=2, global_crc=123, arrays_key="arrays",
                  encode_seconds=0.01, raw_bytes=4000)
DOWN = DownlinkHeader(stream=5, version=3, base=-1, arrays_key="arrays", uplink="topk:0.01|q:4",
                      error_feedback=True, keep=True, server_round=2, seed=42)


def test_headers_round_trip():
    assert UplinkHeader.from_record(UP.to_record(), "n") == UP
    assert DownlinkHeader.from_record(DOWN.to_record()) == DOWN


VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=300),
                   st.lists(st.integers(0, 5), max_size=3))


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(UP.to_record().keys())), value=VALUES)
def test_any_tampered_uplink_field_parses_or_is_rejected_by_name(key, value):
    rec = UP.to_record()
    if value is None:
        del rec[key]
    else:
        try:
            rec[key] = value
        except (TypeError, ValueError):  # not representable in a ConfigRecord at all
            return
    try:
        UplinkHeader.from_record(rec, "node 9")
    except UpdateRejected as exc:
        assert "node 9" in str(exc) and key in str(exc)


def test_out_of_range_values_are_rejected():
    rec = UP.to_record()
    rec["version"] = -1
    with pytest.raises(UpdateRejected, match="'version'"):
        UplinkHeader.from_record(rec, "n")
    rec = UP.to_record()
    rec["encode-seconds"] = float("nan")
    with pytest.raises(UpdateRejected, match="encode-seconds"):
        UplinkHeader.from_record(rec, "n")
    rec = ConfigRecord(dict(DOWN.to_record()))
    rec["keep"] = 1
    with pytest.raises(UpdateRejected, match="'keep'"):
        DownlinkHeader.from_record(rec)
