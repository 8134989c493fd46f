"""Spec-implied payloads (fedslim's uplink): no spec string, no quantizer block; the
receiver passes the spec it asked for. Same tensors out, fewer bytes, strict checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedslim.compression import decode_update, encode_update, parse_spec
from fedslim.compression.bound import payload_stats
from fedslim.compression.wire import SCHEMA_BOUND, SPEC_IMPLIED
from fedslim.errors import DecodeError, EncodeError
from tests.compression.test_malformed import SPECS, body_of, small_update, with_crc
from tests.compression.test_schema_bound import assert_only_decode_errors

SCHEMA = {k: tuple(v.shape) for k, v in small_update().items()}
ALL = [*SPECS, "budget:x4|q:4|ans|pass:0", "topk:0.3|q:4|zstd", "topk:0.3|q:4,block=8|ans"]


def _pair(text: str) -> tuple[bytes, bytes, dict[str, torch.Tensor]]:
    update = small_update()
    bound = encode_update(update, text, generator=torch.Generator().manual_seed(3),
                          schema_bound=True)
    implied, recon = encode_update(update, text, generator=torch.Generator().manual_seed(3),
                                   return_reconstruction=True, schema_bound=True,
                                   spec_implied=True)
    return bound, implied, recon


@pytest.mark.parametrize("text", ALL)
def test_implied_decodes_to_the_same_tensors_without_the_spec_string(text: str) -> None:
    bound, implied, recon = _pair(text)
    assert int.from_bytes(implied[6:8], "little") == SCHEMA_BOUND | SPEC_IMPLIED
    out = decode_update(implied, schema=SCHEMA, expected_spec=text)
    assert str(out.spec) == str(parse_spec(text))
    for k, v in recon.items():
        assert torch.equal(out.tensors[k], v)
    if not text.startswith("budget"):  # (a budget fills its room either way)
        spec_bytes = len(str(parse_spec(text))) + 1
        assert len(bound) - len(implied) >= spec_bytes  # + one block byte per q record
    spec = parse_spec(text)
    stats = payload_stats(implied, schema=SCHEMA, spec=str(spec),
                          block=getattr(spec.values, "block", 0))
    assert stats.payload_bytes == len(implied)


def test_an_implied_payload_needs_the_spec_and_never_decodes_wrong_under_another() -> None:
    _, implied, recon = _pair("topk:0.3|q:4,block=8|ans|pass:0")
    with pytest.raises(DecodeError, match="must pass the spec"):
        decode_update(implied, schema=SCHEMA)
    others = [*SPECS, "topk:0.3|q:4|ans|pass:0", "topk:0.3|q:4,block=16|ans|pass:0",
              "topk:0.3|q:3,block=8|ans|pass:0", "topk:0.3|q:4,block=8|pass:0"]
    rejected = 0
    for other in others:  # a DecodeError, or (a spec that would write the same bytes)
        try:              # exactly the tensors that were sent
            out = decode_update(implied, schema=SCHEMA, expected_spec=other)
        except DecodeError:
            rejected += 1
            continue
        assert all(torch.equal(out.tensors[k], v) for k, v in recon.items()), other
    assert rejected >= len(others) - 1  # (only "no ans": ans did not pay on these tensors)


def test_implied_needs_schema_bound_both_ways() -> None:
    with pytest.raises(EncodeError, match="must be schema-bound"):
        encode_update(small_update(), "q:8", spec_implied=True)
    bound = encode_update(small_update(), "q:8", schema_bound=True)
    with pytest.raises(DecodeError, match="unknown flags"):  # the flag alone
        decode_update(with_crc(body_of(bound), flags=SPEC_IMPLIED), schema=SCHEMA,
                      expected_spec="q:8")


@pytest.mark.parametrize("text", SPECS)
def test_implied_truncations_flips_and_mutations_raise_only_decode_error(text: str) -> None:
    assert_only_decode_errors(_pair(text)[1], SCHEMA_BOUND | SPEC_IMPLIED, seed=1,
                              expected_spec=text)


def test_the_digits_cnn_at_one_per_mille_is_within_6_percent_of_the_bound() -> None:
    """What was 1.074x schema-bound: the spec string and the block bytes were the rest
    (1.049x with wire v2's 4-byte schema digest; the 16-byte one costs 12 bytes)."""
    from fedslim.bench.codecs import digits_cnn_update

    update = digits_cnn_update()
    schema = {k: tuple(v.shape) for k, v in update.items()}
    payload = encode_update(update, "topk:0.001|q:4", generator=torch.Generator().manual_seed(0),
                            schema_bound=True, spec_implied=True)
    stats = payload_stats(payload, schema=schema, spec="topk:0.001|q:4")
    assert stats.over_bound <= 1.06, stats


_names = st.text(alphabet="abcdefgh._", min_size=1, max_size=12)
_shapes = st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.dictionaries(_names, _shapes, min_size=1, max_size=6),
       spec=st.sampled_from([s for s in ALL if not s.startswith("budget")]),
       seed=st.integers(0, 2**16))
def test_any_model_round_trips_spec_implied(shapes: dict[str, tuple[int, ...]], spec: str,
                                            seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    update = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    payload, recon = encode_update(update, spec, generator=g, return_reconstruction=True,
                                   schema_bound=True, spec_implied=True)
    out = decode_update(payload, schema=shapes, expected_spec=spec)
    for k in update:
        assert torch.equal(out.tensors[k], recon[k])
