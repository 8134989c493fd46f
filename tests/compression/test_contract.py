"""The shared suite every stage and every pipeline passes.

Each property is checked only where the spec declares it (``is_lossless``, ``is_unbiased``,
nearest rounding, exact top-k), on hypothesis-generated updates: shapes including 0-d and
empty tensors and the empty model, all input dtypes, zeros, constants, ties, and magnitudes
from 1e-30 to 1e30. Every check goes through real bytes (``bytes(payload)`` copy).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings

from fedslim.compression import (
    CastConfig,
    PipelineSpec,
    Precision,
    QuantizeConfig,
    Rounding,
    SelectMode,
    SignConfig,
    decode_update,
    encode_update,
    parse_spec,
)
from fedslim.compression.lowrank import factor_count
from fedslim.errors import EncodeError
from tests.compression.cases import (
    ALL_SPECS,
    kept_reference,
    make_values,
    quant_step,
    to_tensor,
    updates,
)

EXAMPLES = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_REL_ERROR = {Precision.FP32: 0.0, Precision.FP16: 2.0**-11, Precision.BF16: 2.0**-8}
_ABS_ERROR = {Precision.FP32: 0.0, Precision.FP16: 2.0**-25, Precision.BF16: 2.0**-134}
# (half the spacing of each format's subnormals: below the normal range the relative bound
# no longer holds; bf16's subnormals are spaced 2^-133, fp16's 2^-24)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32),
                                              b.contiguous().view(torch.int32))


FP16_OVERFLOW = 65520.0  # the smallest magnitude that rounds to inf in float16


def overflows_fp16(spec: PipelineSpec, update: dict[str, torch.Tensor]) -> bool:
    """Whether some tensor takes an fp16 path with a value fp16 cannot hold."""
    for t in update.values():
        if t.numel() == 0 or float(t.float().abs().max()) < FP16_OVERFLOW:
            continue
        if is_passthrough(spec, t):
            if spec.passthrough.precision is Precision.FP16:
                return True
        elif spec.values == CastConfig(Precision.FP16):
            return True
    return False


def round_trip(update: dict[str, torch.Tensor], spec: PipelineSpec, seed: int = 0
               ) -> tuple[bytes, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Encode, copy the bytes, decode. An fp16 overflow must be refused (then the example
    is discarded): sending inf would be sending garbage."""
    if overflows_fp16(spec, update):
        with pytest.raises(EncodeError, match="overflow fp16"):
            encode_update(update, spec)
        assume(False)
    gen = torch.Generator().manual_seed(seed)
    payload, recon = encode_update(update, spec, generator=gen, return_reconstruction=True)
    decoded = decode_update(bytes(bytearray(payload)))  # a real copy across the boundary
    assert decoded.spec == spec
    return payload, recon, decoded.tensors


def is_passthrough(spec: PipelineSpec, t: torch.Tensor) -> bool:
    return spec.compresses and t.numel() < spec.passthrough.below


@pytest.mark.parametrize("text", ALL_SPECS)
@EXAMPLES
@given(update=updates())
def test_round_trip_shapes_order_and_bit_identical_reconstruction(
        text: str, update: dict[str, torch.Tensor]) -> None:
    spec = parse_spec(text)
    payload, recon, out = round_trip(update, spec)
    assert list(out) == list(update) == list(recon)
    for name, tensor in update.items():
        assert out[name].dtype == torch.float32 and out[name].device.type == "cpu"
        assert out[name].shape == tensor.shape
        assert bits_equal(out[name], recon[name]), name
        assert bool(torch.isfinite(out[name]).all())
    # decoding is deterministic, whatever the spec
    assert all(bits_equal(out[n], decode_update(payload).tensors[n]) for n in out)


@pytest.mark.parametrize("text", ALL_SPECS)
@EXAMPLES
@given(update=updates())
def test_declared_value_properties(text: str, update: dict[str, torch.Tensor]) -> None:
    """Lossless is exact; casts within half an ulp; nearest quantization within half a step."""
    spec = parse_spec(text)
    _, _, out = round_trip(update, spec)
    kept = kept_reference(spec, update)
    for name, tensor in update.items():
        x = tensor.float().reshape(-1).numpy().astype(np.float64)
        y = out[name].reshape(-1).numpy().astype(np.float64)
        if spec.is_lossless:
            assert bits_equal(out[name], tensor.float())
            continue
        if is_passthrough(spec, tensor):
            p = spec.passthrough.precision
            assert np.all(np.abs(y - x) <= _REL_ERROR[p] * np.abs(x) + _ABS_ERROR[p])
            continue
        if spec.lowrank is not None and factor_count(tuple(tensor.shape), x.size,
                                                     spec.lowrank.rank) is not None:
            # rank-r factors: P P^T M is a projection of M, so never further from it than 0
            if isinstance(spec.values, CastConfig) and spec.values.precision is Precision.FP32:
                assert np.linalg.norm(y - x) <= np.linalg.norm(x) * (1 + 1e-3) + 1e-30
            assert np.all(np.isfinite(y))
            continue
        exact_selection = spec.topk is None or spec.topk.mode is SelectMode.EXACT
        if not exact_selection:
            continue
        idx = kept[name]
        dropped = np.ones(x.size, dtype=bool)
        dropped[idx] = False
        assert np.all(y[dropped] == 0.0), "only the top-k positions may be non-zero"
        xk, yk = x[idx], y[idx]
        values = spec.values
        if isinstance(values, CastConfig):
            p = values.precision
            assert np.all(np.abs(yk - xk) <= _REL_ERROR[p] * np.abs(xk) + _ABS_ERROR[p])
        elif isinstance(values, QuantizeConfig) and values.rounding is Rounding.NEAREST:
            step = quant_step(spec, xk)
            # The code position (v/s + 1) * (L-1)/2 is computed in float32: a value that lands
            # within a few ulps of a half step may round either way (hypothesis found one at
            # 177.5 - 1e-5 for 8 bits), so allow L * 2^-22 steps on top of the half step.
            slack = ((1 << values.bits) - 1) * 2.0 ** -22
            assert np.all(np.abs(yk - xk) <= step * (0.5 + slack) + 1e-44)
        elif isinstance(values, SignConfig):
            assert np.all((yk >= 0) == (xk >= 0)), "sign must be kept"


@pytest.mark.parametrize("text", [s for s in ALL_SPECS if parse_spec(s).topk is not None
                                  and isinstance(parse_spec(s).values, CastConfig)
                                  and parse_spec(s).topk.mode is SelectMode.EXACT])
@EXAMPLES
@given(update=updates())
def test_topk_keeps_exactly_the_largest_magnitudes(text: str, update: dict[str, torch.Tensor]
                                                    ) -> None:
    spec = parse_spec(text)
    _, _, out = round_trip(update, spec)
    for name, idx in kept_reference(spec, update).items():
        if is_passthrough(spec, update[name]):
            continue
        x = update[name].float().reshape(-1)
        expected = torch.zeros_like(x)
        expected[torch.from_numpy(idx)] = x[torch.from_numpy(idx)]
        expected = expected.to(torch.float16 if "fp16" in text else torch.float32).float()
        assert bits_equal(out[name].reshape(-1), expected), name


@pytest.mark.parametrize("text", [s for s in ALL_SPECS if parse_spec(s).is_deterministic])
@EXAMPLES
@given(update=updates())
def test_deterministic_specs_give_identical_bytes(text: str, update: dict[str, torch.Tensor]
                                                  ) -> None:
    assume(not overflows_fp16(parse_spec(text), update))
    first = encode_update(update, text)
    assert encode_update(update, text) == first


UNBIASED = [s for s in ALL_SPECS if parse_spec(s).is_unbiased and not parse_spec(s).is_lossless]
UNBIASED += ["q:1,round=stochastic|pass:0", "q:4,block=5,round=stochastic,scale=norm|pass:0"]


@pytest.mark.parametrize("text", UNBIASED)
@pytest.mark.parametrize("kind", ["heavy", "normal", "constant", "mixed_scale"])
def test_stochastic_rounding_is_unbiased(text: str, kind: str) -> None:
    """Mean over R independent draws converges to the input: |mean - x| <= Hoeffding bound.

    The R draws are R copies of one tensor in a single update (each copy gets its own
    random numbers), so one encode gives all of them. With per-value range one step and
    failure probability delta per value, |mean - x| <= step * sqrt(ln(2/delta) / (2R)).
    """
    spec = parse_spec(text)
    assert isinstance(spec.values, QuantizeConfig)
    copies, n = 400, 300
    x = to_tensor(make_values(np.random.default_rng(1), n, kind, 1.0), (n,), torch.float32)
    update = {f"copy{i}": x for i in range(copies)}
    _, _, out = round_trip(update, spec, seed=7)
    mean = torch.stack(list(out.values())).double().mean(0).numpy()
    xs = x.double().numpy()
    step = quant_step(spec, x.numpy().astype(np.float64))
    tol = step * math.sqrt(math.log(2 / 1e-9) / (2 * copies)) + 1e-6 * np.abs(xs)
    assert np.all(np.abs(mean - xs) <= tol)
    # and it is genuinely random: the copies are not all identical
    distinct = {t.numpy().tobytes() for t in list(out.values())[:20]}
    assert len(distinct) > 1 or kind == "constant"


def test_empty_model_and_empty_tensors() -> None:
    for text in ALL_SPECS:
        assert decode_update(encode_update({}, text)).tensors == {}
        out = decode_update(encode_update({"e": torch.zeros(0, 3), "s": torch.tensor(2.5)}, text))
        assert out.tensors["e"].shape == (0, 3)
        assert out.tensors["s"].shape == () and out.tensors["s"].dtype == torch.float32


def test_source_dtypes_are_reported() -> None:
    update = {"a": torch.ones(3, dtype=torch.float16), "b": torch.ones(2, dtype=torch.float64)}
    decoded = decode_update(encode_update(update, "q:8"))
    assert decoded.source_dtypes == {"a": torch.float16, "b": torch.float64}


@pytest.mark.parametrize("text", ALL_SPECS)
def test_large_tensors_take_the_sampling_path_and_keep_every_property(text: str) -> None:
    """Hypothesis keeps tensors small; here 70k-300k elements go through threshold sampling."""
    rng = np.random.default_rng(5)
    update = {"big": to_tensor(make_values(rng, 300_000, "heavy", 1e-2), (600, 500),
                               torch.float32),
              "mid": to_tensor(make_values(rng, 70_000, "ties", 1.0), (70_000,), torch.bfloat16),
              "bias": to_tensor(make_values(rng, 50, "normal", 1.0), (50,), torch.float32)}
    spec = parse_spec(text)
    _, recon, out = round_trip(update, spec)
    kept = kept_reference(spec, update)
    for name, tensor in update.items():
        assert bits_equal(out[name], recon[name])
        if spec.topk is not None and spec.topk.mode is SelectMode.EXACT \
                and not is_passthrough(spec, tensor):
            nonzero = np.flatnonzero(out[name].reshape(-1).numpy())
            assert np.isin(nonzero, kept[name]).all()
            if spec.values == CastConfig(Precision.FP32):  # kept values arrive exactly
                x = tensor.float().reshape(-1).numpy()
                assert np.array_equal(out[name].reshape(-1).numpy()[kept[name]], x[kept[name]])
