"""Decoding in bounded memory: the chunked / in-place paths give the same bits as the
straightforward ones they replaced, on every chunk boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.compression import decode_update, encode_update, lowrank, positions
from fedslim.compression.positions import PositionCodec, decode_positions, iter_rice
from fedslim.compression.quantize import dequantize
from fedslim.errors import DecodeError


def _rice_section(idx: np.ndarray, numel: int) -> tuple[bytes, int]:
    """A golomb section for sorted ``idx`` via the encoder (``topk:k=..|golomb``)."""
    w = torch.zeros(numel)
    w[torch.from_numpy(idx)] = torch.arange(1, idx.size + 1, dtype=torch.float32)
    payload = encode_update({"w": w}, f"topk:k={idx.size}|fp32|golomb|pass:0")
    from fedslim.compression.wire_read import read_payload

    _, records = read_payload(payload, numel, None, None, 0)
    rec = records[0]
    assert rec.position_codec is PositionCodec.RICE
    return rec.positions.tobytes(), rec.rice_param


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 3000), st.floats(0.001, 0.9), st.integers(0, 2**31 - 1),
       st.sampled_from([1, 3, 64]))
def test_chunked_golomb_equals_the_whole_section(numel, density, seed, chunk):
    rng = np.random.default_rng(seed)
    k = min(numel - 1, max(1, int(numel * density)))
    idx = np.sort(rng.choice(numel, size=k, replace=False)).astype(np.int64)
    data, r = _rice_section(idx, numel)
    arr = np.frombuffer(data, dtype=np.uint8)
    whole = decode_positions(PositionCodec.RICE, r, arr, k, numel, "t")
    old = positions.RICE_CHUNK_BYTES
    positions.RICE_CHUNK_BYTES = chunk
    try:
        parts = list(iter_rice(arr, r, k, numel, "t"))
    finally:
        positions.RICE_CHUNK_BYTES = old
    assert np.array_equal(np.concatenate([p for _, p in parts]), whole)
    assert np.array_equal(whole, idx)
    starts = [s for s, _ in parts]
    assert starts == sorted(starts) and starts[0] == 0


def test_chunked_golomb_rejects_what_the_whole_decoder_rejects():
    idx = np.array([0, 5, 9, 12])
    data, r = _rice_section(idx, 20)
    arr = np.frombuffer(data, dtype=np.uint8)
    for count in (3, 5):  # the header lies about the count
        with pytest.raises(DecodeError):
            list(iter_rice(arr, r, count, 20, "t"))
    with pytest.raises(DecodeError, match="trailing bytes|section is"):
        list(iter_rice(np.concatenate([arr, np.zeros(1, np.uint8)]), r, 4, 20, "t"))


def _reference_reconstruct(values, shape, numel, rank):  # type: ignore[no-untyped-def]
    m, n = lowrank.matrix_shape(shape, numel)
    r = min(rank, m, n)
    p, q = values[: m * r].view(m, r), values[m * r:].view(n, r)
    out = p[:, 0:1] * q[:, 0].unsqueeze(0)
    for j in range(1, r):
        out = out + p[:, j:j + 1] * q[:, j].unsqueeze(0)
    return out.reshape(-1)


@pytest.mark.parametrize("shape,rank", [((128, 1024), 63), ((300, 5000), 4), ((7, 3), 3),
                                        ((64, 32, 3, 3), 8)])
def test_blocked_lowrank_product_is_bit_identical(shape, rank):
    numel = int(np.prod(shape))
    m, n = lowrank.matrix_shape(shape, numel)
    r = min(rank, m, n)
    values = torch.randn(r * (m + n), generator=torch.Generator().manual_seed(0))
    expected = _reference_reconstruct(values, shape, numel, rank)
    assert torch.equal(lowrank.reconstruct(values, shape, numel, rank, "t"), expected)
    out = torch.full((numel,), 7.0)
    got = lowrank.reconstruct(values, shape, numel, rank, "t", out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(out, expected)


@pytest.mark.parametrize("count,block", [(1000, 64), (1000, 0), (999, 100), (5, 64)])
def test_dequantize_into_a_buffer_gives_the_same_bits(count, block):
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (count,), generator=gen, dtype=torch.uint8)
    n_scales = 1 if block == 0 or block >= count else -(-count // block)
    scales = torch.rand(n_scales, generator=gen)
    from fedslim.compression.quantize import _lut

    lut = _lut(4, torch.device("cpu"))  # the reference: fl(lut[c] * s_b), one rounding
    blocks = torch.arange(count) // (block if n_scales > 1 else count)
    expected = lut[codes.long()] * scales[blocks]
    assert torch.equal(dequantize(codes, scales, 4, block), expected)
    out = torch.full((count,), 3.0)
    dequantize(codes, scales, 4, block, out)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("spec", ["topk:0.3|q:4|ans", "topk:0.3|q:4|bitmap|ans",
                                  "topk:0.5|fp32|golomb", "lowrank:8|q:8", "q:2|ans"])
def test_decoding_into_buffers_equals_decoding_fresh(spec):
    gen = torch.Generator().manual_seed(2)
    update = {"a": torch.randn(200, 300, generator=gen), "b": torch.randn(77, generator=gen)}
    payload = encode_update(update, spec, generator=torch.Generator().manual_seed(3))
    fresh = decode_update(payload, max_elements=70_000).tensors
    bufs = {k: torch.full(v.shape, 9.0) for k, v in update.items()}
    into = decode_update(payload, max_elements=70_000, out=bufs).tensors
    for k in update:
        assert torch.equal(fresh[k], into[k]), k
