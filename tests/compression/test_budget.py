"""``budget:``: the payload fits the byte budget, the budget is filled, and what is kept is
the largest magnitudes across tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.compression import decode_update, encode_update, parse_spec
from fedslim.compression.wire import write_payload
from fedslim.compression.wire_read import read_payload
from fedslim.errors import DecodeError, EncodeError, SpecError


def model_update(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(32, 1, 3, 3, generator=g) * scale,
            "conv.bias": torch.randn(32, generator=g) * scale,
            "fc.weight": torch.randn(256, 128, generator=g) * torch.rand(256, 128, generator=g)
            ** 3 * scale,
            "out.weight": torch.randn(10, 128, generator=g) * 0.1 * scale}


@pytest.mark.parametrize(("text", "canonical"), [
    ("budget:4KB|q:4|ans", "budget:4000|q:4|ans"), ("budget: 2KiB | q:2", "budget:2048|q:2"),
    ("budget:x200|q:4", "budget:x200|q:4"), ("budget:x12.5|sign", "budget:x12.5|sign"),
    ("budget:1MB|fp16", "budget:1000000|fp16"),
    ("budget:5000|q:4|golomb", "budget:5000|q:4|golomb")])
def test_spec_forms_are_canonical(text: str, canonical: str) -> None:
    spec = parse_spec(text)
    assert str(spec) == canonical and parse_spec(canonical) == spec
    assert spec.topk is not None and spec.topk.is_budget and spec.at_round(1, 4) == spec


@pytest.mark.parametrize("bad", ["budget", "budget:", "budget:4.5B", "budget:10", "budget:x0.5",
                                 "budget:4KB|topk:0.1", "topk:0.1|budget:4KB", "budget:4GBs",
                                 "budget:4KB,scope=tensor"])
def test_bad_budgets_are_one_spec_error(bad: str) -> None:
    with pytest.raises(SpecError, match="invalid compression spec"):
        parse_spec(bad)


@settings(max_examples=40, deadline=None)
@given(limit=st.integers(400, 40_000), bits=st.sampled_from([2, 4, 8]), ans=st.booleans(),
       seed=st.integers(0, 1000))
def test_payload_fits_and_fills_the_budget(limit: int, bits: int, ans: bool, seed: int) -> None:
    spec = f"budget:{limit}|q:{bits}" + ("|ans" if ans else "")
    update = model_update(seed)
    payload, sent = encode_update(update, spec, return_reconstruction=True)
    assert len(payload) <= limit
    decoded = decode_update(payload, expected_spec=spec).tensors
    assert all(torch.equal(decoded[k], sent[k]) for k in update)
    _, records = read_payload(payload, 1 << 24)
    kept = sum(r.count for r in records if r.numel >= 256)
    pool = sum(r.numel for r in records if r.numel >= 256)
    if kept < pool:  # the budget is used: a few more values would not have fitted
        assert len(payload) > limit - 12 * (bits + 2 + np.log2(pool / kept)) / 8 - 64


def test_kept_values_are_the_largest_magnitudes_across_tensors() -> None:
    update = model_update(3)
    payload = encode_update(update, "budget:3000|q:8")
    _, records = read_payload(payload, 1 << 24)
    counts = {r.name: r.count for r in records}
    flat = torch.cat([v.reshape(-1).abs() for k, v in update.items() if v.numel() >= 256])
    k = sum(c for name, c in counts.items() if update[name].numel() >= 256)
    threshold = torch.topk(flat, k).values[-1]
    for name, v in update.items():
        if v.numel() >= 256:
            assert counts[name] == int((v.abs() >= threshold).sum())
    assert counts["fc.weight"] > counts["out.weight"]  # allocation follows the magnitudes


def test_ratio_budget_scales_with_the_model() -> None:
    update = model_update(1)
    numel = sum(v.numel() for v in update.values())
    for ratio in (50, 200):
        assert len(encode_update(update, f"budget:x{ratio}|q:4|ans")) <= 4 * numel / ratio


def test_budget_below_the_fixed_cost_is_a_clear_error() -> None:
    with pytest.raises(EncodeError, match="below this update's fixed cost"):
        encode_update(model_update(), "budget:200|q:4")


def test_decoder_rejects_a_payload_over_its_budget() -> None:
    payload = encode_update(model_update(), "budget:3000|q:4")
    text, records = read_payload(payload, 1 << 24)
    forged = write_payload("budget:1000|q:4", records, None)
    with pytest.raises(DecodeError, match="over its spec's budget"):
        decode_update(forged)

