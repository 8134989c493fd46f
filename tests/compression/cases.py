"""Shared cases for the compression test suite: pipelines, update generators, references."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import strategies as st

from fedslim.compression import PipelineSpec, QuantizeConfig, ScaleStat, parse_spec
from fedslim.compression.fidelity import energy_count, select_energy

# Every stage alone (with pass:0 so even tiny tensors go through it) and realistic pipelines.
STAGE_SPECS = [
    "none",
    "fp16",
    "bf16",
    "q:8|pass:0",
    "q:4,block=16|pass:0",
    "q:1|pass:0",
    "q:3,scale=norm|pass:0",
    "q:2,round=stochastic|pass:0",
    "sign:block=8|pass:0",
    "topk:0.1|pass:0",
    "topk:k=7|pass:0",
    "topk:0.2,scope=global|pass:0",
    "topk:0.3|bitmap|pass:0",
    "topk:0.05|golomb|pass:0",
    "topk:0.5|zstd|pass:0",
    "q:4|ans|pass:0",
    "lowrank:2|pass:0",
    "lowrank:3|q:8,block=32|ans|pass:0",
    "q:8,block=16|ans|pass:0",
    "topk:0.1,mode=sampled,tol=0.2|pass:0",
    "pass:64,dtype=fp16|zstd",
    "energy:0.6|pass:0",
    "energy:0.3,scope=global|q:4|pass:0",
]
PIPELINE_SPECS = [
    "topk:0.01|q:4",
    "topk:0.01|q:2",
    "topk:0.001|q:4",
    "topk:0.01|sign",
    "topk:0.01,mode=sampled,scope=global|q:4,block=256,round=stochastic|zstd",
    "topk:0.05|q:4,block=32|golomb|pass:32",
    "topk:0.25|q:8|bitmap|pass:16,dtype=bf16",
    "q:8",
    "q:8,round=stochastic,scale=norm|zstd",
    "topk:0.1|fp16|zstd:19",
    "topk:0.01|q:4|ans",
    "topk:0.05|q:2,round=stochastic|golomb|ans|zstd",
    "energy:0.5|q:4|ans|pass:0",
    "energy:0.9,scope=global|q:8|ans",
    "energy:0.5,scope=global,floor=0.25|q:2|ans|pass:0",
]
ALL_SPECS = STAGE_SPECS + PIPELINE_SPECS

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_KINDS = ["normal", "heavy", "zeros", "constant", "ties", "sparse", "mixed_scale"]


def make_values(rng: np.random.Generator, n: int, kind: str, scale: float) -> np.ndarray:
    """float64 values of a given character: the shapes of data that break codecs."""
    if kind == "normal":
        x = rng.standard_normal(n)
    elif kind == "heavy":
        x = rng.standard_t(2.5, n)
    elif kind == "zeros":
        x = np.zeros(n)
    elif kind == "constant":
        x = np.full(n, rng.choice([-1.0, 1.0]))
    elif kind == "ties":
        x = rng.integers(-3, 4, n).astype(np.float64)
    elif kind == "sparse":
        x = rng.standard_normal(n) * (rng.random(n) < 0.05)
    else:
        x = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 7, n)
    return x * scale


def to_tensor(values: np.ndarray, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    finfo = torch.finfo(dtype)
    limit = min(finfo.max, float(np.finfo(np.float32).max)) * 0.5  # stay finite through casts
    clipped = np.clip(values, -limit, limit)
    return torch.from_numpy(clipped).to(dtype).reshape(shape)


@st.composite
def tensors(draw: st.DrawFn, max_numel: int = 600) -> torch.Tensor:
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(0 if ndim else 1, 12), min_size=ndim, max_size=ndim)))
    if math.prod(shape) > max_numel:
        shape = (draw(st.integers(1, max_numel)),)
    n = math.prod(shape)
    kind = draw(st.sampled_from(_KINDS))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return to_tensor(make_values(rng, n, kind, scale), shape, dtype)


@st.composite
def updates(draw: st.DrawFn, max_tensors: int = 4) -> dict[str, torch.Tensor]:
    """Model updates: 0..max_tensors tensors with state_dict-like (and odd UTF-8) names."""
    typical = st.sampled_from(["conv1.weight", "conv1.bias", "fc.w", "é/ü 🙂"])
    names = draw(st.lists(st.one_of(typical, st.text(max_size=12)), max_size=max_tensors,
                          unique=True))
    return {name: draw(tensors()) for name in names}


# -- references -----------------------------------------------------------------------------
def reference_topk(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k largest |x|, ties broken towards the lowest index."""
    order = np.lexsort((np.arange(flat.size), -np.abs(flat)))
    return np.sort(order[:k])


def kept_reference(spec: PipelineSpec, update: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """For exact top-k specs: the index set each tensor must keep (all for passthrough)."""
    topk = spec.topk
    flats = {n: t.detach().float().reshape(-1).numpy().astype(np.float64)
             for n, t in update.items()}
    out = {n: np.arange(f.size) for n, f in flats.items()}
    if topk is None:
        return out
    pool = [n for n, f in flats.items() if f.size >= spec.passthrough.below]

    def count(values: list[np.ndarray]) -> int:
        """k of the spec for these values (an energy stage: its own count, which
        tests/compression/test_energy.py checks against a float64 reference)."""
        if topk.energy is None:
            return topk.k_for(sum(v.size for v in values))
        return energy_count([torch.from_numpy(v.astype(np.float32)) for v in values],
                            topk.energy)

    if topk.energy is not None and topk.floor:  # global, then each tensor's own floor
        out.update({n: np.asarray(i.numpy()) for n, i in zip(pool, select_energy(
            [torch.from_numpy(flats[n].astype(np.float32)) for n in pool], topk), strict=True)})
        return out

    if topk.scope.value == "global":
        joined = np.concatenate([flats[n] for n in pool]) if pool else np.zeros(0)
        keep = reference_topk(joined, count([flats[n] for n in pool]))
        start = 0
        for n in pool:
            size = flats[n].size
            out[n] = keep[(keep >= start) & (keep < start + size)] - start
            start += size
    else:
        for n in pool:
            out[n] = reference_topk(flats[n], count([flats[n]]))
    return out


def quant_step(spec: PipelineSpec, kept_values: np.ndarray) -> np.ndarray:
    """Per-value quantization step 2s/(L-1) for the spec's quantizer over the kept values."""
    cfg = spec.values
    assert isinstance(cfg, QuantizeConfig)
    levels = (1 << cfg.bits) - 1
    n = kept_values.size
    block = cfg.block if 0 < cfg.block < n else max(n, 1)
    steps = np.empty(n)
    for start in range(0, n, block):
        chunk = kept_values[start:start + block]
        s = np.abs(chunk).max() if chunk.size else 0.0
        if cfg.scale is ScaleStat.NORM:
            s = max(s, float(np.linalg.norm(chunk)))
        steps[start:start + block] = 2.0 * s / levels
    return steps


def spec_of(text: str) -> PipelineSpec:
    return parse_spec(text)
