"""The ``ans`` stage: rANS-coded quantized values -- exact, near the entropy, hostile-proof."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.compression import decode_update, encode_update, parse_spec
from fedslim.compression.entropy import decode_codes, empirical_entropy_bytes, encode_codes
from fedslim.compression.wire import write_payload
from fedslim.compression.wire_read import read_payload
from fedslim.errors import DecodeError, SpecError

pytest.importorskip("constriction")


def heavy_update(n: int = 20_000, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4  # heavy-tailed
    return {"w": w.reshape(-1, 100), "b": torch.randn(300, generator=g)}


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_codes_round_trip_exactly(bits: int, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 3000))
    skew = data.draw(st.floats(0.0, 6.0))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    p = np.exp(-skew * np.abs(np.arange(1 << bits) - (1 << bits) / 2) / (1 << bits))
    codes = rng.choice(1 << bits, size=n, p=p / p.sum()).astype(np.uint8)
    blob = np.frombuffer(encode_codes(codes, bits), np.uint8)
    assert np.array_equal(decode_codes(blob, bits, n, "t"), codes)


def test_size_is_within_a_percent_of_the_empirical_entropy() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_t(2, size=200_000)
    codes = np.clip(np.round((x / np.abs(x).max() + 1) * 7.5), 0, 15).astype(np.uint8)
    size = len(encode_codes(codes, 4))
    bound = empirical_entropy_bytes(codes, 4)
    assert bound < size <= bound * 1.01 + 40  # + the 16-entry histogram


@pytest.mark.parametrize("spec", ["q:4|ans", "topk:0.05|q:4|ans", "q:8|ans|zstd",
                                  "topk:0.1|q:3,block=64|golomb|ans"])
def test_ans_is_lossless_over_the_quantized_pipeline(spec: str) -> None:
    update = heavy_update()
    plain = str(replace(parse_spec(spec), entropy=None))
    coded, sent = encode_update(update, spec, return_reconstruction=True)
    reference = decode_update(encode_update(update, plain)).tensors
    decoded = decode_update(coded).tensors
    for k in update:
        assert torch.equal(decoded[k], reference[k]) and torch.equal(decoded[k], sent[k])
    assert len(coded) < len(encode_update(update, plain))


def test_each_record_keeps_the_smaller_form() -> None:
    g = torch.Generator().manual_seed(3)
    update = {"signs": torch.randn(4096, generator=g), "tiny": torch.randn(9, generator=g)}
    _, records = read_payload(encode_update(update, "q:1|ans|pass:0"), 1 << 20)
    assert [r.entropy for r in records] == [False, False]  # 1 bit/value already: packed
    _, records = read_payload(encode_update(heavy_update(), "q:4|ans"), 1 << 20)
    assert records[0].entropy


def test_spec_needs_quantized_values() -> None:
    assert str(parse_spec("topk:0.01 | q:4 | ans | zstd")) == "topk:0.01|q:4|ans|zstd"
    for bad in ("ans", "topk:0.1|ans", "fp16|ans", "sign|ans", "q:4|zstd|ans", "q:4|ans:3"):
        with pytest.raises(SpecError):
            parse_spec(bad)


def _coded_record(spec: str = "q:4|ans|pass:0") -> tuple[str, list]:  # type: ignore[type-arg]
    text, records = read_payload(encode_update(heavy_update(4000), spec), 1 << 20)
    assert records[0].entropy
    return text, records


def _with_values(values: np.ndarray) -> bytes:
    text, records = _coded_record()
    records[0] = replace(records[0], values=values.astype(np.uint8))
    return write_payload(text, records, None)


def test_hostile_sections_are_typed_errors() -> None:
    text, records = _coded_record()
    good = records[0].values
    other = good.copy()
    other[2] ^= 0x40  # one model entry changed: not the model the codes imply
    cases = {
        "rANS stream": np.concatenate([good[:-4], [1, 2, 3, 4]]),
        "rANS stream ": good[:-1],
        "ends in a zero byte": np.concatenate([good, [0]]),
        "end inside the model": good[:1],
        "rANS stream  ": other,
    }
    for message, values in cases.items():
        with pytest.raises(DecodeError, match=message.strip()):
            decode_update(_with_values(values))
    spec_without = write_payload("q:4|pass:0", records, None)
    with pytest.raises(DecodeError, match="no entropy-coded values"):
        decode_update(spec_without)


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(min_size=1, max_size=400))
def test_any_values_section_is_a_typed_error_or_the_declared_codes(junk: bytes) -> None:
    text, records = _coded_record()
    limit = records[0].values.size
    values = np.frombuffer(junk[: limit - 1] or b"\x00", np.uint8)
    records[0] = replace(records[0], values=values)
    try:
        out = decode_update(write_payload(text, records, None))
    except DecodeError:
        return
    assert out.tensors["w"].shape == (40, 100)


def test_model_fields_are_checked() -> None:
    codes = np.array([0, 1, 1, 3, 1, 0], np.uint8)
    blob = np.frombuffer(encode_codes(codes, 2), np.uint8)
    assert blob[0] >> 4 == 0b1011  # after the 4-bit entry width: codes 0, 1 and 3 occur
    assert np.array_equal(decode_codes(blob, 2, 6, "t"), codes)
    b = int(blob[0] & 0xF)
    used = 4 + 4 + 3 * b
    if used % 8:
        pad = blob.copy()
        pad[used // 8] |= 0x80  # a padding bit of the model's last byte
        with pytest.raises(DecodeError, match="padding"):
            decode_codes(pad, 2, 6, "t")
    missing = blob.copy()
    missing[0] &= 0x7F  # code 3 no longer listed: the stream decodes to other codes
    with pytest.raises(DecodeError):
        decode_codes(missing, 2, 6, "t")
    with pytest.raises(DecodeError, match="no code"):
        decode_codes(np.frombuffer(bytes([0]), np.uint8), 2, 6, "t")
    wide = blob.copy()
    wide[0] = (wide[0] & 0xF0) | 9  # 9-bit entries (at most 8)
    with pytest.raises(DecodeError, match="9-bit entries"):
        decode_codes(wide, 2, 6, "t")


def test_each_code_sequence_has_one_encoding_per_width() -> None:
    """The decoder recomputes the model's entries from the codes it decoded and refuses
    any other model, even one that would decode them (a review found several)."""
    import constriction

    from fedslim.compression.entropy import _entries, _weights

    codes = np.array([0, 1, 1, 0, 1, 2, 2, 2, 0, 1] * 20, np.uint8)
    blob = encode_codes(codes, 2)
    assert np.array_equal(decode_codes(np.frombuffer(blob, np.uint8), 2, 200, "t"), codes)
    hist = np.bincount(codes, minlength=4)
    present = hist > 0
    for b, t in ((1, [1, 2, 2]), (1, [1, 1, 1]), (3, [8, 8, 8]), (8, [200, 255, 256])):
        assert not np.array_equal(_entries(hist[present], b), t)
        model = constriction.stream.model.Categorical(_weights(np.array(t), present),
                                                      perfect=False)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(codes.astype(np.int32), model)
        stream = coder.get_compressed().astype("<u4").tobytes()
        stream = stream[:-4] + stream[-4:].rstrip(b"\0")
        entries = ((np.array(t)[:, None] - 1) >> np.arange(b)) & 1
        head = np.packbits(np.concatenate([(b >> np.arange(4)) & 1, present.astype(int),
                                           entries.reshape(-1)]).astype(np.uint8),
                           bitorder="little").tobytes()
        with pytest.raises(DecodeError, match="not the one its codes imply"):
            decode_codes(np.frombuffer(head + stream, np.uint8), 2, 200, "t")


def test_one_code_needs_no_stream_and_allows_none() -> None:
    codes = np.full(500, 5, np.uint8)
    blob = np.frombuffer(encode_codes(codes, 4), np.uint8)
    assert blob.size == 3  # 4 + 16 bits of model, nothing else
    assert np.array_equal(decode_codes(blob, 4, 500, "t"), codes)
    with pytest.raises(DecodeError, match="stream bytes follow"):
        decode_codes(np.concatenate([blob, [7]]), 4, 500, "t")
    wide = blob.copy()
    wide[0] |= 3  # entries for a single code
    with pytest.raises(DecodeError, match="entries"):
        decode_codes(wide, 4, 500, "t")


def test_small_records_cost_little_over_their_entropy() -> None:
    """Mean bytes over the codes' empirical entropy, 20 draws each: measured 6.5, 10.1 and
    13.4 here for 18, 131 and 1,311 codes; the exact histogram and a whole 32-bit word (the
    form before) cost 16.2, 21.4 and 25.6."""
    for n, most in ((18, 8.0), (131, 12.0), (1311, 15.0)):
        over = [len(encode_codes(c, 4)) - empirical_entropy_bytes(c, 4)
                for c in (_skewed(n, 4, 6.0, seed) for seed in range(20))]
        assert float(np.mean(over)) <= most, (n, np.mean(over))


# ----------------------------------------------------------------- interleaved lane coder
def _skewed(n: int, bits: int, skew: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.exp(-skew * np.abs(np.arange(1 << bits) - (1 << bits) / 2) / (1 << bits))
    return rng.choice(1 << bits, size=n, p=p / p.sum()).astype(np.uint8)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(1, 3000), steps=st.integers(1, 40),
       skew=st.floats(0.0, 12.0), seed=st.integers(0, 2**32 - 1))
def test_lane_coder_round_trips_exactly(bits: int, n: int, steps: int, skew: float,
                                        seed: int) -> None:
    import fedslim.compression.entropy as entropy

    codes = _skewed(n, bits, skew, seed)
    with pytest.MonkeyPatch.context() as mp:  # small records take the lane path here
        mp.setattr(entropy, "LANE_MIN", 1)
        mp.setattr(entropy, "LANE_STEPS", steps)
        blob = np.frombuffer(encode_codes(codes, bits), np.uint8)
        assert np.array_equal(decode_codes(blob, bits, n, "t"), codes)


def test_lane_coder_on_a_large_record_is_near_the_entropy() -> None:
    """Above LANE_MIN codes: ceil(n / 2048) lanes, within ~1.5% of the empirical entropy."""
    import fedslim.compression.entropy as entropy

    rng = np.random.default_rng(3)
    x = rng.standard_t(3, size=entropy.LANE_MIN + 4321) * rng.lognormal(0, 0.5, 1)
    codes = np.clip(np.round(x / np.abs(x).max() * 127) + 128, 0, 255).astype(np.uint8)
    blob = encode_codes(codes, 8)
    assert np.array_equal(decode_codes(np.frombuffer(blob, np.uint8), 8, codes.size, "t"),
                          codes)
    bound = empirical_entropy_bytes(codes, 8)
    assert bound < len(blob) <= bound * 1.015 + 32 + 2 * 256  # + bitmap and histogram


def test_hostile_lane_sections_are_typed_errors() -> None:
    import fedslim.compression.entropy as entropy

    codes = _skewed(500, 4, 6.0, 1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(entropy, "LANE_MIN", 1)
        mp.setattr(entropy, "LANE_STEPS", 16)
        good = np.frombuffer(encode_codes(codes, 4), np.uint8)
        head = 2 + len(entropy._varints(np.bincount(codes, minlength=16)[
            np.bincount(codes, minlength=16) > 0]))
        cases = {
            "whole 16-bit words": good[:-1],
            "end early": good[:-2],
            "do not end where": np.concatenate([good, [0, 0]]),
            "below 2\\^16": np.concatenate([good[:head], [0, 0, 0, 0], good[head + 4:]]),
        }
        for message, blob in cases.items():
            with pytest.raises(DecodeError, match=message):
                decode_codes(blob, 4, 500, "t")
        rng = np.random.default_rng(0)
        for _ in range(200):  # any flipped byte after the histogram: typed, or the codes
            bad = good.copy()
            i = int(rng.integers(head, bad.size))
            bad[i] ^= int(rng.integers(1, 256))
            try:
                out = decode_codes(bad, 4, 500, "t")
            except DecodeError:
                continue
            assert np.array_equal(np.bincount(out, minlength=16), np.bincount(codes, minlength=16))
