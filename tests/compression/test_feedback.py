"""Error feedback conserves mass and survives serialisation of its state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.compression import ErrorFeedback, encode_update, parse_spec
from fedslim.errors import DecodeError, EncodeError


def _rounds(seed: int, rounds: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(40, 30, generator=g) * 1e-2,
             "b": torch.randn(30, generator=g) * 1e-3,
             "v": torch.randn(2000, generator=g).to(torch.float64)} for _ in range(rounds)]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31),
       text=st.sampled_from(["topk:0.01|q:4", "topk:0.05|sign", "topk:0.1,scope=global|q:2",
                             "q:2,round=stochastic|pass:0", "topk:0.02,mode=sampled|bf16"]),
       warmup=st.integers(0, 3), through_state=st.booleans())
def test_mass_is_conserved(seed: int, text: str, warmup: int, through_state: bool) -> None:
    """sum(sent over rounds) + residual == sum(inputs), per tensor, to float tolerance."""
    spec = parse_spec(text)
    updates = _rounds(seed, 5)
    ef = ErrorFeedback()
    sent_total = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in updates[0].items()}
    for rnd, update in enumerate(updates, start=1):
        if through_state:
            ef = ErrorFeedback.from_state(ef.state_dict())
        corrected = ef.apply(update)
        _, sent = encode_update(corrected, spec.at_round(rnd, warmup),
                                generator=torch.Generator().manual_seed(rnd),
                                return_reconstruction=True)
        ef.record(corrected, sent)
        for n in sent_total:
            sent_total[n] += sent[n].double()
    for n, total in sent_total.items():
        inputs = sum(u[n].float().double() for u in updates)
        residual = ef.residual(n)
        assert residual is not None
        assert torch.allclose(total + residual.double(), inputs, rtol=0, atol=1e-6)


def test_residual_is_zero_for_new_tensors_and_kept_for_absent_ones() -> None:
    ef = ErrorFeedback()
    a = {"x": torch.ones(3)}
    assert torch.equal(ef.apply(a)["x"], torch.ones(3))
    ef.record(a, {"x": torch.tensor([1.0, 0.0, 0.0])})
    assert torch.equal(ef.apply({"x": torch.zeros(3)})["x"], torch.tensor([0.0, 1.0, 1.0]))
    ef.record({"y": torch.ones(2)}, {})  # nothing sent: all of it is residual
    assert torch.equal(ef.residual("y"), torch.ones(2))  # type: ignore[arg-type]
    assert torch.equal(ef.residual("x"), torch.tensor([0.0, 1.0, 1.0]))  # type: ignore[arg-type]
    assert len(ef) == 2


def test_state_is_plain_cpu_tensors_and_round_trips() -> None:
    ef = ErrorFeedback()
    ef.record({"x": torch.arange(4.0)}, {"x": torch.zeros(4)})
    state = ef.state_dict()
    assert set(state) == {"x"} and state["x"].device.type == "cpu"
    assert state["x"].dtype == torch.float32
    state["x"].zero_()  # a copy: mutating it does not touch the live residual
    assert torch.equal(ErrorFeedback.from_state(ef.state_dict()).residual("x"), torch.arange(4.0))  # type: ignore[arg-type]


def test_errors_are_typed() -> None:
    ef = ErrorFeedback()
    ef.record({"x": torch.ones(3)}, {"x": torch.zeros(3)})
    with pytest.raises(EncodeError, match="shape"):
        ef.apply({"x": torch.ones(4)})
    with pytest.raises(EncodeError, match="shape"):
        ef.record({"x": torch.ones(3)}, {"x": torch.ones(2)})
    with pytest.raises(DecodeError, match="NaN"):
        ErrorFeedback.from_state({"x": torch.tensor([float("nan")])})
    with pytest.raises(DecodeError, match="float tensor"):
        ErrorFeedback.from_state({"x": torch.ones(2, dtype=torch.int64)})


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), text=st.sampled_from(["topk:0.01|q:4", "q:2|pass:0"]))
def test_in_place_record_is_bit_identical(seed: int, text: str) -> None:
    """record(..., in_place=True) keeps the same residuals, inside corrected's tensors."""
    a, b = ErrorFeedback(), ErrorFeedback()
    for rnd, update in enumerate(_rounds(seed, 3), start=1):
        ca, cb = a.apply(update), b.apply(update)
        _, sent = encode_update(ca, text, generator=torch.Generator().manual_seed(rnd),
                                return_reconstruction=True)
        a.record(ca, sent)
        b.record(cb, sent, in_place=True)
        for n in update:
            ra, rb = a.residual(n), b.residual(n)
            assert ra is not None and rb is not None and torch.equal(ra, rb)
            assert rb.data_ptr() == cb[n].data_ptr()  # (float32: reused, not copied)


def test_apply_in_place_adds_into_the_callers_float32_tensors() -> None:
    """``in_place=True``: same values as the copying form; float32 inputs are reused (no
    model-sized allocation), other dtypes converted into new tensors, untouched."""
    g = torch.Generator().manual_seed(3)
    ef = ErrorFeedback.from_state({"w": torch.randn(50, 4, generator=g),
                                   "v": torch.randn(30, generator=g)})
    update = {"w": torch.randn(50, 4, generator=g), "v": torch.randn(30, generator=g).double(),
              "new": torch.randn(6, generator=g)}
    wanted = ef.apply(update)
    v_before = update["v"].clone()
    got = ef.apply(update, in_place=True)
    for k in update:
        assert torch.equal(got[k], wanted[k]), k
    assert got["w"].data_ptr() == update["w"].data_ptr()
    assert got["new"].data_ptr() == update["new"].data_ptr()
    assert got["v"].dtype == torch.float32 and torch.equal(update["v"], v_before)
    with pytest.raises(EncodeError, match="residual has"):
        ef.apply({"w": torch.zeros(4, 50)}, in_place=True)
