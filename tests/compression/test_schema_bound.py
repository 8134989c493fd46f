"""Schema-bound payloads: no names/shapes on the wire, the same tensors out, strict checks."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedslim.compression import decode_update, encode_update
from fedslim.compression.bound import payload_stats
from fedslim.compression.wire import HEADER, SCHEMA_BOUND, schema_digest
from fedslim.errors import DecodeError, EncodeError
from tests.compression.test_malformed import SPECS, body_of, small_update, with_crc

SCHEMA = {k: tuple(v.shape) for k, v in small_update().items()}


@pytest.mark.parametrize("text", [*SPECS, "budget:x4|q:4|ans|pass:0", "topk:0.3|q:4|zstd"])
def test_bound_decodes_to_the_same_tensors_in_fewer_bytes(text: str) -> None:
    update = small_update()
    plain, recon = encode_update(update, text, generator=torch.Generator().manual_seed(3),
                                 return_reconstruction=True)
    bound, recon_b = encode_update(update, text, generator=torch.Generator().manual_seed(3),
                                   return_reconstruction=True, schema_bound=True)
    assert int.from_bytes(bound[6:8], "little") == SCHEMA_BOUND
    out = decode_update(bound, schema=SCHEMA, expected_spec=text)
    assert set(out.tensors) == set(update)
    for k in update:
        assert torch.equal(out.tensors[k], recon_b[k])
        assert out.tensors[k].shape == update[k].shape
    if not text.startswith("budget"):  # (a budget fills its room either way)
        assert len(bound) < len(plain)
        for k in update:  # the same selection and values: only the framing differs
            assert torch.equal(recon[k], recon_b[k])
    stats = payload_stats(bound, schema=SCHEMA)
    assert stats.payload_bytes == len(bound)


def test_metadata_shrinks_on_the_digits_cnn() -> None:
    """The digits CNN at 0.1%: names/shapes were ~14% of the payload."""
    from fedslim.bench.codecs import digits_cnn_update

    update = digits_cnn_update()
    schema = {k: tuple(v.shape) for k, v in update.items()}
    gen = torch.Generator
    plain = encode_update(update, "topk:0.001|q:4", generator=gen().manual_seed(0))
    bound = encode_update(update, "topk:0.001|q:4", generator=gen().manual_seed(0),
                          schema_bound=True)
    assert len(plain) - len(bound) >= 120
    assert payload_stats(bound, schema=schema).over_bound < 1.08  # 1.074 (16-byte digest)


def test_a_bound_payload_needs_the_schema_and_the_right_one() -> None:
    payload = encode_update(small_update(), "topk:0.3|q:4", schema_bound=True)
    with pytest.raises(DecodeError, match="must pass its schema"):
        decode_update(payload)
    for other in ({**SCHEMA, "fc": (81,)},                      # another shape
                  {**SCHEMA, "extra": (1,)},                     # one tensor more
                  {k: v for k, v in SCHEMA.items() if k != "fc"},  # one fewer
                  {("x" + k): v for k, v in SCHEMA.items()}):   # other names
        with pytest.raises(DecodeError, match="another set of tensors"):
            decode_update(payload, schema=other)
    # The order of the receiver's mapping does not matter (records are in sorted order).
    reordered = dict(reversed(list(SCHEMA.items())))
    assert schema_digest(reordered) == schema_digest(SCHEMA)
    assert set(decode_update(payload, schema=reordered).tensors) == set(SCHEMA)


def test_mixed_dtypes_cannot_be_schema_bound() -> None:
    update = {"a": torch.ones(4), "b": torch.ones(4, dtype=torch.float16)}
    with pytest.raises(EncodeError, match="one source dtype"):
        encode_update(update, "q:8", schema_bound=True)


def test_max_elements_binds_bound_payloads_too() -> None:
    payload = encode_update(small_update(), "q:8", schema_bound=True)
    with pytest.raises(DecodeError, match="over the limit"):
        decode_update(payload, schema=SCHEMA, max_elements=50)


def assert_only_decode_errors(payload: bytes, flags: int, seed: int, **kwargs: object) -> None:
    """Every truncation, 40 bit flips and 150 checksum-valid mutations of ``payload``:
    a DecodeError, or finite tensors of the schema's shapes, with < 64 MB allocated."""
    for cut in range(len(payload)):
        with pytest.raises(DecodeError):
            decode_update(payload[:cut], schema=SCHEMA, **kwargs)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    for bit in rng.integers(0, 8 * len(payload), 40):
        flipped = bytearray(payload)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecodeError):
            decode_update(bytes(flipped), schema=SCHEMA, **kwargs)  # type: ignore[arg-type]
    body = body_of(payload)
    tracemalloc.start()
    try:
        for _ in range(150):  # valid checksum: field validation itself must hold
            mutated = bytearray(body)
            for pos in rng.integers(0, len(body), rng.integers(1, 4)):
                mutated[pos] = int(rng.integers(0, 256))
            try:
                out = decode_update(with_crc(bytes(mutated), flags=flags), schema=SCHEMA,
                                    max_elements=1 << 20, **kwargs)  # type: ignore[arg-type]
            except DecodeError:
                continue
            assert all(bool(torch.isfinite(t).all()) for t in out.tensors.values())
            assert {k: tuple(t.shape) for k, t in out.tensors.items()} == SCHEMA
        assert tracemalloc.get_traced_memory()[1] < 64 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("text", SPECS)
def test_bound_truncations_flips_and_mutations_raise_only_decode_error(text: str) -> None:
    assert_only_decode_errors(encode_update(small_update(), text, schema_bound=True),
                              SCHEMA_BOUND, seed=0)


def test_the_flag_on_a_plain_body_is_rejected() -> None:
    plain = encode_update(small_update(), "q:8")
    with pytest.raises(DecodeError):
        decode_update(with_crc(body_of(plain), flags=SCHEMA_BOUND), schema=SCHEMA)
    assert len(HEADER.pack(b"FSLM", 1, 0, 0, 0)) == 20


_names = st.text(alphabet="abcdefgh._", min_size=1, max_size=12)
_shapes = st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.dictionaries(_names, _shapes, min_size=1, max_size=6),
       spec=st.sampled_from(SPECS), seed=st.integers(0, 2**16))
def test_any_model_round_trips_schema_bound(shapes: dict[str, tuple[int, ...]], spec: str,
                                            seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    update = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    payload, recon = encode_update(update, spec, generator=g, return_reconstruction=True,
                                   schema_bound=True)
    out = decode_update(payload, schema=shapes)
    for k in update:
        assert torch.equal(out.tensors[k], recon[k])
