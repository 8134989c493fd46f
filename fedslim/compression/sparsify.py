"""Top-k sparsification by magnitude, per tensor or across all tensors.

A full sort, ``torch.topk`` or ``torch.kthvalue`` over 10M elements costs ~150 ms on one CPU
core, so selection is done in two vectorised passes instead, as in Deep Gradient Compression:

1. estimate the threshold from a small stratified random sample of ``|x|`` (~512 expected
   hits above it), then take every element at or above it -- one compare and one
   ``flatnonzero`` over the tensor, the only O(n) passes;
2. ``exact`` mode samples a slightly *lower* threshold (about 5 sigma of the sampling error),
   so the candidates are a small superset of the top k, and finishes with an exact k-th
   value among the candidates. The result is exactly the k largest magnitudes, ties broken
   towards the lowest (tensor, index), whatever the random sample was;
3. ``sampled`` mode keeps the candidates of the unbiased threshold as they are when their
   count is within ``k * (1 +- tol)``, trims them to exactly k when there are too many, and
   falls back to ``exact`` when there are too few. So the count is always within tolerance.

If the sample misleads (e.g. a tensor of ties), the code falls back to an exact selection over
all elements, which is always correct, just slower. Indices come back sorted, as int64, on the
tensor's device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from fedslim.compression.spec import Scope, SelectMode, TopKConfig

SAMPLE_HITS = 256
"""Expected number of sampled elements above the threshold: sets the sample size."""
MIN_SAMPLE = 4096
MAX_SAMPLE = 1 << 16
"""At very low density fewer hits are sampled and the candidate margin grows instead: random
gathers cost more than refining a few thousand extra candidates."""
EXACT_BELOW = 1 << 16
"""Groups with fewer elements are selected exactly over all elements (sampling would not pay)."""


def select_topk(flats: Sequence[torch.Tensor], config: TopKConfig,
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Indices of the kept entries of each 1-D float32 tensor in ``flats``.

    With ``scope=tensor`` each tensor keeps ``config.k_for(numel)`` entries; with
    ``scope=global`` the tensors share one budget ``config.k_for(total)`` and one threshold.
    """
    if config.scope is Scope.GLOBAL:
        total = sum(f.numel() for f in flats)
        return _select(flats, config.k_for(total), config, generator)
    return [_select([f], config.k_for(f.numel()), config, generator)[0] for f in flats]


def select_count(flats: Sequence[torch.Tensor], k: int,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Indices of exactly the ``k`` largest magnitudes across ``flats`` (ties: lowest
    (tensor, index) first), per tensor; ``k = 0`` keeps nothing."""
    if k <= 0:
        return [torch.zeros(0, dtype=torch.int64, device=f.device) for f in flats]
    return _select(flats, k, TopKConfig(count=k, scope=Scope.GLOBAL), generator)


def _select(flats: Sequence[torch.Tensor], k: int, config: TopKConfig,
            generator: torch.Generator | None) -> list[torch.Tensor]:
    total = sum(f.numel() for f in flats)
    if k >= total:
        return [torch.arange(f.numel(), device=f.device) for f in flats]
    if k == 0:
        return [torch.zeros(0, dtype=torch.int64, device=f.device) for f in flats]
    wanted = min(MAX_SAMPLE, max(MIN_SAMPLE, math.ceil(SAMPLE_HITS * total / k)))
    if total < EXACT_BELOW or 4 * wanted >= total:
        return _refine(flats, None, k)
    sample = _sample_abs(flats, wanted, generator)
    if sample.numel() == 0:  # thousands of tiny tensors each rounded to a zero share
        return _refine(flats, None, k)
    expected = sample.numel() * k / total
    if config.mode is SelectMode.SAMPLED:
        cands = _above_all(flats, _kth_largest(sample, max(1, round(expected))))
        found = sum(c.numel() for c in cands)
        if k * (1 - config.tol) <= found <= k * (1 + config.tol):
            return cands
        if found >= k:
            return _refine(flats, cands, k)
    rank = math.ceil(expected + 5.0 * math.sqrt(expected) + 8.0)
    if rank <= sample.numel():
        cands = _above_all(flats, _kth_largest(sample, rank))
        if sum(c.numel() for c in cands) >= k:
            return _refine(flats, cands, k)
    return _refine(flats, None, k)


def _sample_abs(flats: Sequence[torch.Tensor], wanted: int,
                generator: torch.Generator | None) -> torch.Tensor:
    """|x| at random positions, stratified: each tensor gets its share of the sample."""
    total = sum(f.numel() for f in flats)
    device = flats[0].device
    parts = []
    for f in flats:
        share = round(wanted * f.numel() / total)
        if share == 0:
            continue
        gen_device = generator.device if generator is not None else f.device
        pos = torch.randint(f.numel(), (share,), generator=generator, device=gen_device)
        parts.append(f[pos.to(f.device)].abs().to(device))
    return torch.cat(parts) if parts else torch.zeros(0, device=device)


def _kth_largest(values: torch.Tensor, rank: int) -> float:
    """The rank-th largest of a 1-D tensor (rank >= 1): an O(n) selection, never a sort."""
    pos = values.numel() - rank
    if values.device.type == "cpu":  # introselect: 10x faster than torch.kthvalue on CPU
        return float(np.partition(values.numpy(), pos)[pos])
    return float(torch.kthvalue(values, pos + 1).values)


def _above_all(flats: Sequence[torch.Tensor], threshold: float) -> list[torch.Tensor]:
    return [_above(f, threshold) for f in flats]


def _above(flat: torch.Tensor, threshold: float) -> torch.Tensor:
    """Sorted indices of ``|flat| >= threshold``: the one full pass of the selection."""
    if threshold <= 0.0:
        return torch.arange(flat.numel(), device=flat.device)
    if flat.device.type == "cpu":  # numpy: huge-page buffers and a faster flatnonzero
        x = flat.numpy()
        return torch.from_numpy(np.flatnonzero((x >= threshold) | (x <= -threshold)))
    return torch.nonzero(flat.abs() >= threshold).squeeze(1)


def _refine(flats: Sequence[torch.Tensor], cands: list[torch.Tensor] | None, k: int
            ) -> list[torch.Tensor]:
    """Exactly the k largest |x| among candidates (all elements when ``cands`` is None)."""
    if cands is None:
        cands = [torch.arange(f.numel(), device=f.device) for f in flats]
        mags = [f.abs() for f in flats]
    else:
        mags = [f[c].abs() for f, c in zip(flats, cands, strict=True)]
    device = flats[0].device
    joined = torch.cat([m.to(device) for m in mags])
    threshold = _kth_largest(joined, k)
    above = joined > threshold
    ties = joined == threshold
    need = k - int(above.sum())
    keep = above | (ties & (torch.cumsum(ties, 0) <= need))  # lowest (tensor, index) first
    out = []
    for c, part in zip(cands, torch.split(keep, [c.numel() for c in cands]), strict=True):
        out.append(c[part.to(c.device)])
    return out
