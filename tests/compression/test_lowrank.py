"""``lowrank:R``: which tensors are factorised, exact reconstruction, hostile records."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedslim.compression import decode_update, encode_update
from fedslim.compression.lowrank import factor_count, reconstruct
from fedslim.compression.wire import write_payload
from fedslim.compression.wire_read import read_payload
from fedslim.errors import DecodeError


@pytest.mark.parametrize(("shape", "rank", "expected"), [
    ((300, 500), 4, 4 * 800), ((64, 32, 3, 3), 4, 4 * (64 + 288)), ((10, 10), 8, None),
    ((128,), 2, None), ((1000, 2), 4, None),
    ((3, 1000), 4, None)])  # rank capped at 3: 3 x 1003 factors are not fewer than 3000
def test_which_tensors_are_factorised(shape: tuple[int, ...], rank: int,
                                      expected: int | None) -> None:
    numel = 1
    for d in shape:
        numel *= d
    assert factor_count(shape, numel, rank) == expected


def test_lowrank_reconstruction_does_not_depend_on_thread_count() -> None:
    """P Q^T is a fixed-order sum of outer products: the same bits with 1 or 2 threads
    (a matmul's blocking would not be), so client and server copies cannot drift."""

    g = torch.Generator().manual_seed(5)
    values = torch.randn(7 * (300 + 500), generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = reconstruct(values, (300, 500), 150_000, 7, "t")
        torch.set_num_threads(2)
        two = reconstruct(values, (300, 500), 150_000, 7, "t")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    p, q = values[:2100].view(300, 7), values[2100:].view(500, 7)
    torch.testing.assert_close(one.view(300, 500), p @ q.T, rtol=1e-5, atol=1e-5)



def test_a_record_with_the_wrong_factor_count_is_rejected() -> None:
    update = {"w": torch.randn(64, 48, generator=torch.Generator().manual_seed(1))}
    payload = encode_update(update, "lowrank:3|q:8")
    assert decode_update(payload).kept == {"w": 3 * (64 + 48)}
    text, records = read_payload(payload, 1 << 20)
    forged = write_payload(text, [replace(records[0], rice_param=4)], None)
    with pytest.raises(DecodeError):
        decode_update(forged)
