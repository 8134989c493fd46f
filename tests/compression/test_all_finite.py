"""all_finite: the one-pass finiteness check agrees with isfinite().all() everywhere."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.compression.buffers import all_finite

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       bad=st.lists(st.tuples(st.floats(0, 1), st.sampled_from(
           [float("nan"), float("inf"), float("-inf"), 1e30, -1e30])), max_size=3))
def test_agrees_with_isfinite_all(n: int, dtype: torch.dtype, seed: int,
                                  bad: list[tuple[float, float]]) -> None:
    t = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)
    for where, value in bad:
        if n:
            t[min(n - 1, int(where * n))] = value  # (1e30 overflows fp16/bf16? -> inf)
    assert all_finite(t) == bool(torch.isfinite(t).all())
    assert all_finite(t.reshape(1, -1) if n else t) == bool(torch.isfinite(t).all())


def test_integers_and_empty_are_finite() -> None:
    assert all_finite(torch.arange(10))
    assert all_finite(torch.zeros(0))
    assert not all_finite(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]).t())  # strided
