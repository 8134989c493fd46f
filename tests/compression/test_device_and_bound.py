"""CUDA parity (skipped without a GPU) and the size-vs-information-bound target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedslim.compression import decode_update, encode_update
from fedslim.compression.bound import log2_binomial, payload_stats
from tests.compression.cases import ALL_SPECS

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {"w": torch.from_numpy(rng.standard_t(3, (300, 200)).astype(np.float32)),
            "b": torch.from_numpy(rng.standard_normal(40).astype(np.float32)),
            "v": torch.from_numpy(rng.standard_normal(5000)).to(torch.bfloat16)}


@needs_cuda
@pytest.mark.parametrize("text", ALL_SPECS)
def test_cuda_encode_matches_cpu_decode_bit_for_bit(text: str) -> None:
    update = {k: v.cuda() for k, v in _update().items()}
    gen = torch.Generator(device="cuda").manual_seed(0)
    payload, sent = encode_update(update, text, generator=gen, return_reconstruction=True)
    on_cpu = decode_update(payload).tensors
    on_gpu = decode_update(payload, device="cuda").tensors
    for name, tensor in sent.items():
        assert tensor.device.type == "cuda"
        assert torch.equal(tensor.cpu().view(torch.int32), on_cpu[name].view(torch.int32))
        assert torch.equal(on_gpu[name].cpu().view(torch.int32), on_cpu[name].view(torch.int32))


@needs_cuda
def test_cuda_deterministic_specs_give_the_same_bytes_as_cpu_for_lossless() -> None:
    update = _update()
    for text in ("none", "fp16", "bf16"):
        cpu = encode_update(update, text)
        gpu = encode_update({k: v.cuda() for k, v in update.items()}, text)
        assert cpu == gpu


def test_log2_binomial() -> None:
    assert log2_binomial(10, 0) == 0.0 and log2_binomial(10, 10) == 0.0
    assert abs(log2_binomial(10, 3) - np.log2(120)) < 1e-9


@pytest.mark.parametrize("text", ["topk:0.01|q:4", "topk:0.01,scope=global|q:4",
                                  "topk:0.01,mode=sampled|q:4,block=256"])
def test_target_pipeline_within_ten_percent_of_the_information_bound(text: str) -> None:
    """The benchmark's size target, on a 1M-element heavy-tailed update (fast enough here)."""
    rng = np.random.default_rng(0)
    rows = rng.lognormal(0.0, 0.5, (1000, 1)).astype(np.float32)
    update = {"w": torch.from_numpy(rng.standard_t(3, (1000, 1000)).astype(np.float32) * rows)}
    stats = payload_stats(encode_update(update, text))
    assert stats.kept in (10_000, pytest.approx(10_000, rel=0.1))
    assert stats.over_bound <= 1.10


def test_stats_of_a_dense_payload() -> None:
    stats = payload_stats(encode_update({"w": torch.zeros(1000)}, "q:8"))
    assert stats.kept == 1000 and stats.bound_bits == 1000 * 8 + 32
    assert stats.payload_bytes > 1000 and 1.0 < stats.over_bound < 1.1
