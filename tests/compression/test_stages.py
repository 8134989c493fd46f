"""Each stage on its own: bit packing, position codes, selection, quantizers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.compression import (
    PositionCoding,
    QuantizeConfig,
    Rounding,
    ScaleStat,
    Scope,
    SelectMode,
    SignConfig,
    TopKConfig,
)
from fedslim.compression.bitpack import pack_codes, pack_uint, unpack_codes, unpack_uint
from fedslim.compression.positions import (
    PositionCodec,
    best_rice_param,
    decode_positions,
    encode_positions,
)
from fedslim.compression.quantize import decode_values, encode_values
from fedslim.compression.sparsify import select_topk
from fedslim.errors import DecodeError
from tests.compression.cases import reference_topk

FAST = settings(max_examples=60, deadline=None)


# -- bit packing ------------------------------------------------------------------------------
@FAST
@given(bits=st.integers(1, 8), count=st.integers(0, 200), seed=st.integers(0, 2**31))
def test_pack_codes_round_trip_and_size(bits: int, count: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, count).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.size == (count * bits + 7) // 8
    assert np.array_equal(unpack_codes(packed, bits, count, "t"), codes)


@FAST
@given(bits=st.integers(1, 62), count=st.integers(0, 50), seed=st.integers(0, 2**31))
def test_pack_uint_round_trip(bits: int, count: int, seed: int) -> None:
    values = np.random.default_rng(seed).integers(0, 1 << bits, count, dtype=np.int64)
    assert np.array_equal(unpack_uint(pack_uint(values, bits), bits, count, "t"), values)


def test_unpack_rejects_set_padding_and_wrong_length() -> None:
    with pytest.raises(DecodeError, match="padding"):
        unpack_codes(np.array([0xFF], np.uint8), 3, 2, "t")
    with pytest.raises(DecodeError, match="expected 1"):
        unpack_codes(np.array([0, 0], np.uint8), 4, 2, "t")


# -- position codes ---------------------------------------------------------------------------
@st.composite
def index_sets(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    numel = draw(st.integers(1, 5000))
    density = draw(st.sampled_from([0.0005, 0.01, 0.1, 0.5, 0.9, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    k = min(numel, max(0, round(density * numel)))
    return np.sort(rng.choice(numel, k, replace=False)).astype(np.int64), numel


@FAST
@given(case=index_sets(), coding=st.sampled_from(list(PositionCoding)))
def test_positions_round_trip(case: tuple[np.ndarray, int], coding: PositionCoding) -> None:
    idx, numel = case
    enc = encode_positions(idx, numel, coding)
    out = decode_positions(enc.codec, enc.param, enc.data, idx.size, numel, "t")
    assert np.array_equal(np.arange(numel) if out is None else out, idx)


@FAST
@given(case=index_sets())
def test_auto_picks_the_smaller_code(case: tuple[np.ndarray, int]) -> None:
    idx, numel = case
    sizes = {c: encode_positions(idx, numel, c).data.size
             for c in (PositionCoding.BITMAP, PositionCoding.GOLOMB)}
    auto = encode_positions(idx, numel, PositionCoding.AUTO)
    assert auto.data.size == (0 if idx.size == numel else min(sizes.values()))


@pytest.mark.parametrize("density", [0.001, 0.01, 0.05])
def test_golomb_sits_near_the_information_bound(density: float) -> None:
    """Random positions: the code is within 3% of log2 C(n, k) bits."""
    numel = 200_000
    k = int(density * numel)
    idx = np.sort(np.random.default_rng(0).choice(numel, k, replace=False)).astype(np.int64)
    enc = encode_positions(idx, numel, PositionCoding.GOLOMB)
    bound = (math.lgamma(numel + 1) - math.lgamma(k + 1) - math.lgamma(numel - k + 1)) / math.log(2)
    assert enc.codec is PositionCodec.RICE
    assert 8 * enc.data.size <= 1.03 * bound + 16


def test_rice_parameter_is_the_exact_minimiser_nearby() -> None:
    gaps = np.random.default_rng(0).geometric(0.01, 10_000).astype(np.int64) - 1
    r, size = best_rice_param(gaps)
    assert r in (5, 6, 7) and size > 0


# -- top-k selection --------------------------------------------------------------------------
@st.composite
def flat_tensors(draw: st.DrawFn) -> torch.Tensor:
    n = draw(st.sampled_from([1, 7, 300, 70_000, 300_000]))
    kind = draw(st.sampled_from(["normal", "ties", "zeros", "heavy"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    x = {"normal": rng.standard_normal(n), "ties": rng.integers(-2, 3, n).astype(float),
         "zeros": np.zeros(n), "heavy": rng.standard_t(2, n)}[kind]
    return torch.from_numpy(x.astype(np.float32))


@settings(max_examples=25, deadline=None)
@given(x=flat_tensors(), fraction=st.sampled_from([0.001, 0.01, 0.2, 0.7, 1.0]))
def test_exact_topk_matches_the_reference(x: torch.Tensor, fraction: float) -> None:
    cfg = TopKConfig(fraction=fraction)
    (idx,) = select_topk([x], cfg, torch.Generator().manual_seed(0))
    assert np.array_equal(idx.numpy(), reference_topk(x.numpy(), cfg.k_for(x.numel())))


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.sampled_from([5, 300, 80_000]), min_size=1, max_size=4),
       seed=st.integers(0, 2**31))
def test_global_topk_shares_one_budget(sizes: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    flats = [torch.from_numpy((rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e3]))
                              .astype(np.float32)) for n in sizes]
    cfg = TopKConfig(fraction=0.01, scope=Scope.GLOBAL)
    chosen = select_topk(flats, cfg)
    joined = np.concatenate([f.numpy() for f in flats])
    expected = reference_topk(joined, cfg.k_for(joined.size))
    offsets = np.cumsum([0, *sizes])
    got = np.concatenate([c.numpy() + offsets[i] for i, c in enumerate(chosen)])
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("n", [100_000, 1_000_000])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1])
def test_sampled_topk_count_within_tolerance_and_threshold_consistent(n: int, fraction: float
                                                                      ) -> None:
    x = torch.from_numpy(np.random.default_rng(3).standard_t(3, n).astype(np.float32))
    cfg = TopKConfig(fraction=fraction, mode=SelectMode.SAMPLED, tol=0.1)
    k = cfg.k_for(n)
    for seed in range(5):
        (idx,) = select_topk([x], cfg, torch.Generator().manual_seed(seed))
        assert k * 0.9 <= idx.numel() <= k * 1.1
        assert bool((idx[1:] > idx[:-1]).all())
        mask = torch.zeros(n, dtype=torch.bool)
        mask[idx] = True
        assert float(x.abs()[mask].min()) >= float(x.abs()[~mask].max())  # a true threshold


# -- quantizers -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("block", [0, 1, 7])
@pytest.mark.parametrize("scale", list(ScaleStat))
def test_nearest_error_at_most_half_a_step(bits: int, block: int, scale: ScaleStat) -> None:
    values = torch.from_numpy(np.random.default_rng(bits).standard_t(2, 999).astype(np.float32))
    cfg = QuantizeConfig(bits=bits, block=block, scale=scale)
    enc = encode_values(values, cfg, None, "t")
    out = decode_values(enc)
    per_value = enc.scales.repeat_interleave(block if block else values.numel())[:values.numel()]
    half_step = per_value / ((1 << bits) - 1)
    assert bool(((out - values).abs() <= half_step * (1 + 1e-5)).all())
    assert int(enc.data.max()) < (1 << bits)


def test_stochastic_levels_are_the_two_neighbours() -> None:
    values = torch.linspace(-1, 1, 1001)
    cfg = QuantizeConfig(bits=3, rounding=Rounding.STOCHASTIC)
    step = 2.0 / 7
    for seed in range(3):
        enc = encode_values(values, cfg, torch.Generator().manual_seed(seed), "t")
        assert bool(((decode_values(enc) - values).abs() < step + 1e-6).all())


def test_sign_is_mean_magnitude_times_sign() -> None:
    values = torch.tensor([3.0, -1.0, 2.0, -2.0, 0.5, -0.5, 4.0])
    enc = encode_values(values, SignConfig(block=4), None, "t")
    out = decode_values(enc)
    assert torch.allclose(enc.scales, torch.tensor([2.0, (0.5 + 0.5 + 4.0) / 3]))
    assert torch.equal(torch.sign(out), torch.sign(values))


def test_extreme_magnitudes_stay_finite() -> None:
    fmax = torch.finfo(torch.float32).max
    tiny = torch.finfo(torch.float32).smallest_normal / 4  # subnormal
    for values in (torch.tensor([fmax, -fmax, fmax / 3]), torch.tensor([tiny, -tiny, 0.0])):
        for cfg in (QuantizeConfig(4, scale=ScaleStat.NORM), QuantizeConfig(8), SignConfig()):
            out = decode_values(encode_values(values, cfg, None, "t"))
            assert bool(torch.isfinite(out).all())
