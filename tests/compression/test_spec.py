"""The spec grammar: canonical printing, round trips, one clear error per invalid spec."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.compression import (
    CastConfig,
    PassthroughConfig,
    PipelineSpec,
    PositionCoding,
    Precision,
    QuantizeConfig,
    Rounding,
    ScaleStat,
    Scope,
    SelectMode,
    SignConfig,
    TopKConfig,
    ZstdConfig,
    parse_spec,
)
from fedslim.errors import SpecError

CANONICAL = [
    "none", "fp16", "bf16", "q:8", "q:4,block=256,round=stochastic,scale=norm", "sign:block=64",
    "topk:0.01|q:4", "topk:0.01|q:4|golomb", "topk:k=100|bitmap", "topk:0.001|sign|zstd:9",
    "topk:0.01,mode=sampled,scope=global,tol=0.2|q:4,block=256,round=stochastic|zstd",
    "topk:0.05|fp16|pass:1024,dtype=bf16", "q:8|pass:0", "zstd",
]


@pytest.mark.parametrize("text", CANONICAL)
def test_canonical_strings_print_back_identically(text: str) -> None:
    assert str(parse_spec(text)) == text


@pytest.mark.parametrize(("text", "canonical"), [
    ("topk:0.01|q:4|auto", "topk:0.01|q:4"),
    (" topk : 1% | q:4 , round = nearest ", "topk:0.01|q:4"),
    ("topk:1e-3|rice", "topk:0.001|golomb"),
    ("fp32", "none"),
    ("pass:256|q:8", "q:8"),
    ("topk:0.01,mode=exact,scope=tensor|q:8,block=0,scale=max|zstd:3", "topk:0.01|q:8|zstd"),
])
def test_equivalent_spellings_normalise(text: str, canonical: str) -> None:
    assert str(parse_spec(text)) == canonical


topk_configs = st.one_of(
    st.builds(TopKConfig, fraction=st.floats(1e-6, 1.0), mode=st.sampled_from(list(SelectMode)),
              scope=st.sampled_from(list(Scope))),
    st.builds(TopKConfig, count=st.integers(1, 10**9), scope=st.sampled_from(list(Scope))),
    st.builds(TopKConfig, fraction=st.floats(1e-6, 1.0), mode=st.just(SelectMode.SAMPLED),
              tol=st.floats(0.01, 0.99)),
)
value_configs = st.one_of(
    st.builds(QuantizeConfig, bits=st.integers(1, 8), rounding=st.sampled_from(list(Rounding)),
              block=st.integers(0, 4096), scale=st.sampled_from(list(ScaleStat))),
    st.builds(SignConfig, block=st.integers(0, 4096)),
    st.builds(CastConfig, precision=st.sampled_from(list(Precision))),
)


@st.composite
def specs(draw: st.DrawFn) -> PipelineSpec:
    topk = draw(st.none() | topk_configs)
    positions = draw(st.sampled_from(list(PositionCoding))) if topk else PositionCoding.AUTO
    return PipelineSpec(
        topk=topk, values=draw(value_configs), positions=positions,
        zstd=draw(st.none() | st.builds(ZstdConfig, level=st.integers(1, 22))),
        passthrough=draw(st.builds(PassthroughConfig, below=st.integers(0, 1 << 20),
                                   precision=st.sampled_from(list(Precision)))))


@settings(max_examples=300, deadline=None)
@given(spec=specs())
def test_every_spec_round_trips_through_its_string(spec: PipelineSpec) -> None:
    text = str(spec)
    assert parse_spec(text) == spec
    assert str(parse_spec(text)) == text
    assert "|" not in text or "none" not in text


@pytest.mark.parametrize(("text", "fragment"), [
    ("", "empty stage"),
    ("topk:0.1||q:4", "empty stage"),
    ("foo", "unknown stage 'foo'; known stages:"),
    ("q", "needs a bit width"),
    ("q:9", "1..8"),
    ("q:four", "non-negative integer"),
    ("q:4,blk=2", "unknown option(s) ['blk']; accepted: round, block, scale"),
    ("q:4,round=up", "round must be one of nearest|stochastic"),
    ("q:4|topk:0.1", "must come before 'q'"),
    ("q:4|q:8", "conflicts with 'q'"),
    ("q:4|sign", "conflicts with 'q'"),
    ("topk:k=0", "count must be >= 1"),
    ("topk:0", "ambiguous"),
    ("topk:2", "topk:2% (keep 2% = fraction 0.02), topk:0.02, or topk:k=2"),
    ("topk:0.1,k=3", "not both"),
    ("topk:1.5", "fraction must be in (0, 1]"),
    ("topk:nan", "finite"),
    ("topk:0.1,tol=0.2", "tol applies only to mode=sampled"),
    ("golomb", "needs a 'topk' stage"),
    ("none|q:4", "'none' must be the whole spec"),
    ("zstd:30", "level must be in 1..22"),
    ("pass:10,dtype=fp8", "dtype must be one of fp32|fp16|bf16"),
    ("fp16:3", "takes no positional argument"),
    ("q:4,round", "takes one positional argument"),
    ("q:4,=3", "malformed option"),
    ("topk:0.1" + "|pass:1" * 200, "characters"),
    ("tôpk:0.1", "ASCII"),
])
def test_invalid_specs_give_one_clear_error(text: str, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    message = str(info.value)
    assert message.startswith(f"invalid compression spec {text!r}: ")
    assert fragment in message


def test_properties() -> None:
    assert parse_spec("none").is_lossless and parse_spec("topk:1.0").is_lossless
    assert not parse_spec("fp16").is_lossless
    assert parse_spec("q:4,round=stochastic").is_unbiased
    assert not parse_spec("topk:0.1|q:4,round=stochastic").is_unbiased
    assert parse_spec("q:8").is_deterministic
    assert not parse_spec("q:8,round=stochastic").is_deterministic
    assert not parse_spec("topk:0.1,mode=sampled").is_deterministic
    # passthrough precision matters only when something is compressed
    assert not parse_spec("q:8|pass:64,dtype=fp16").is_lossless


def test_at_round_warmup_schedule() -> None:
    spec = parse_spec("topk:0.001|q:4")
    densities = [spec.at_round(r, 4).topk.fraction for r in range(1, 7)]  # type: ignore[union-attr]
    assert densities[0] == 0.25 and densities[4:] == [0.001, 0.001]
    assert all(a > b for a, b in zip(densities[:4], densities[1:5], strict=True))
    ratios = [b / a for a, b in zip(densities[:4], densities[1:5], strict=True)]
    assert max(ratios) - min(ratios) < 1e-9  # exponential decay
    assert spec.at_round(1, 4, start_density=1.0).topk.fraction == 1.0  # type: ignore[union-attr]
    assert spec.at_round(3, 0) is spec
    plain = parse_spec("q:8")
    assert plain.at_round(1, 5) is plain
    assert parse_spec(str(spec.at_round(2, 4))) == spec.at_round(2, 4)
    with pytest.raises(SpecError, match="fractional"):
        parse_spec("topk:k=100").at_round(1, 3)
    with pytest.raises(SpecError):
        spec.at_round(0, 3)
