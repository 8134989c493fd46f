"""Reused buffers: scratch() hands out the same memory per thread and role, and the codecs
write into caller buffers with exactly the bits they would produce in fresh tensors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from flwr.app import Array
from hypothesis import given, settings
from hypothesis import strategies as st

from fedslim.compression import buffers, decode_update, encode_update
from fedslim.errors import DecodeError
from fedslim.flower_io import apply_delta, array_tensor


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(300, 20, generator=g), "b": torch.randn(20, generator=g),
            "c": torch.randn(8, 3, 5, 5, generator=g)}


def test_scratch_reuses_per_role_and_replaces_on_another_model() -> None:
    m = _model()
    a = buffers.scratch("t-role", m)
    b = buffers.scratch("t-role", m)
    assert all(a[k].data_ptr() == b[k].data_ptr() for k in m)
    assert all(a[k].shape == m[k].shape and a[k].dtype == m[k].dtype for k in m)
    other = buffers.scratch("t-other", m)
    assert all(other[k].data_ptr() != a[k].data_ptr() for k in m)
    grown = buffers.scratch("t-role", {**m, "w": torch.zeros(301, 20)})
    assert grown["w"].shape == (301, 20)
    again = buffers.scratch("t-role", {**m, "w": torch.zeros(301, 20)})
    assert again["w"].data_ptr() == grown["w"].data_ptr()


def test_scratch_is_per_thread() -> None:
    m = _model()
    here = buffers.scratch("t-thread", m)["w"].data_ptr()
    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(buffers.scratch("t-thread", m)["w"]
                                                    .data_ptr()))
    t.start()
    t.join()
    assert seen and seen[0] != here


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16),
       spec=st.sampled_from(["topk:0.05|q:4", "topk:0.1|q:8,round=nearest|ans",
                             "topk:0.02,scope=global|bf16", "q:4", "topk:0.3|pass:0"]))
def test_codecs_write_the_same_bits_into_reused_buffers(seed: int, spec: str) -> None:
    m = _model(seed)
    gen = {"generator": torch.Generator().manual_seed(seed)}
    payload, fresh = encode_update(m, spec, return_reconstruction=True, **gen)
    out = buffers.scratch("t-codec", m)
    for v in out.values():
        v.fill_(7.0)  # stale contents from an earlier round must not leak through
    gen = {"generator": torch.Generator().manual_seed(seed)}
    payload2, reused = encode_update(m, spec, return_reconstruction=True,
                                     reconstruction_out=out, **gen)
    assert payload2 == payload
    for k in m:
        assert torch.equal(reused[k], fresh[k]), k
    for v in out.values():
        v.fill_(-3.0)
    decoded = decode_update(payload, out=out).tensors
    plain = decode_update(payload).tensors
    for k in m:
        assert torch.equal(decoded[k], plain[k]) and torch.equal(plain[k], fresh[k]), k
    if spec == "topk:0.05|q:4":  # a sparse record is densified in place
        assert decoded["w"].data_ptr() == out["w"].data_ptr()


def test_buffers_that_do_not_fit_are_ignored_and_inputs_never_overwritten() -> None:
    m = _model(1)
    wrong = {"w": torch.zeros(10), "b": torch.zeros(20, dtype=torch.float64),
             "c": m["c"]}  # wrong size, wrong dtype, the input itself
    before = m["c"].clone()
    _, sent = encode_update(m, "topk:0.1|q:8", return_reconstruction=True,
                            reconstruction_out=wrong)
    assert torch.equal(m["c"], before)
    assert all(sent[k].data_ptr() != wrong[k].data_ptr() for k in m)
    _, plain = encode_update(m, "topk:0.1|q:8", return_reconstruction=True)
    assert all(torch.equal(sent[k], plain[k]) for k in m)


def test_apply_delta_into_buffers_and_in_place() -> None:
    prev, delta = _model(2), _model(3)
    want = {k: prev[k] + delta[k] for k in prev}
    into = buffers.scratch("t-apply", prev)
    got = apply_delta(prev, delta, into)
    assert all(torch.equal(got[k], want[k]) and got[k].data_ptr() == into[k].data_ptr()
               for k in prev)
    again = apply_delta(got, delta, into)  # a second chain step, in place
    assert all(torch.equal(again[k], want[k] + delta[k]) for k in prev)
    assert all(again[k].data_ptr() == into[k].data_ptr() for k in prev)


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.arange(6, dtype=np.float64).reshape(3, 2),
    np.zeros((0, 5), dtype=np.float32),
    np.array(2.5, dtype=np.float32),
    np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    np.arange(5, dtype=">f4"),
    np.arange(7, dtype=np.int64),
])
def test_array_tensor_reads_what_array_numpy_reads(array: np.ndarray) -> None:
    arr = Array(array)
    got = array_tensor(arr)
    want = arr.numpy()
    assert tuple(got.shape) == want.shape
    assert np.array_equal(got.numpy(), want)


def test_array_tensor_is_zero_copy_for_plain_npy_and_typed_on_garbage() -> None:
    arr = Array(np.arange(1000, dtype=np.float32))
    t = array_tensor(arr)
    start = np.frombuffer(arr.data, dtype=np.uint8).ctypes.data
    assert start <= t.data_ptr() < start + len(arr.data)  # inside the Array's bytes
    bad = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=b"not an npy")
    with pytest.raises(DecodeError, match="numpy"):
        array_tensor(bad)
    header = Array(np.arange(4, dtype=np.float32))
    header.data = header.data.replace(b"(4,)", b"(-1,)")  # numpy's reader lets it through
    with pytest.raises(DecodeError, match="negative"):
        array_tensor(header)
    short = Array(np.arange(10, dtype=np.float32))
    short.data = short.data[:-8]  # header says 10 values, 8 are there
    with pytest.raises(DecodeError):
        array_tensor(short)
