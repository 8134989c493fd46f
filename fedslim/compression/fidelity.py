"""``energy:E`` selection: the fewest largest-magnitude values that hold a fraction ``E`` of
an update's energy (its squared L2 norm).

A fixed fraction or a byte budget keeps the same *share of the values* on every model,
whatever the model's updates look like: 1% of a large, redundant layer holds most of its
update, 1% of a small or evenly spread one holds little. ``energy`` fixes what the receiver
gets instead -- the reconstruction keeps ``E`` of the update's squared norm (before
quantization), so its cosine with the update is at least ``sqrt(E)`` -- and lets the number
of values, hence the bytes, follow the update. With ``scope=tensor`` every tensor keeps
``E`` of its own energy (no layer is starved by a larger one); with ``scope=global`` the
update as a whole does -- the water-filling choice, fewest values for the energy -- and a
``floor`` F keeps at least F of every tensor's own energy on top (a layer whose updates are
small next to the others' still moves every round).

The count is exact and deterministic: a random sample only narrows down the candidates (an
element at or above a threshold whose candidates provably hold enough energy), then the
candidates are sorted and summed in float64. The selection itself is
:func:`fedslim.compression.sparsify.select_count`, so ties break as in ``topk``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedslim.compression.sparsify import select_count
from fedslim.compression.spec import Scope, TopKConfig

SORT_BELOW = 1 << 17
"""Groups with fewer elements are sorted whole (cheaper than sampling)."""
SAMPLE = 1 << 16


def energy_count(flats: Sequence[torch.Tensor], fraction: float,
                 generator: torch.Generator | None = None) -> int:
    """The fewest largest-|x| entries of ``flats`` (1-D float32, taken together) whose
    squares sum to at least ``fraction`` of all squares; 0 for an all-zero group."""
    total_n = sum(f.numel() for f in flats)
    if total_n == 0:
        return 0
    total = math.fsum(_energy(f) for f in flats)
    if total == 0.0:
        return 0
    if fraction >= 1.0:
        return sum(int(torch.count_nonzero(f)) for f in flats)
    target = fraction * total
    if total_n < SORT_BELOW:
        return _count_in(torch.cat([f.double() ** 2 for f in flats]), target)
    sample = _sample_sq(flats, min(total_n, SAMPLE), generator)
    est = torch.cumsum(sample, 0) * (total_n / sample.numel())
    pos = int(torch.searchsorted(est, torch.tensor([target], dtype=est.dtype)))
    rank = min(sample.numel() - 1, math.ceil(1.5 * pos + 64))
    while True:
        threshold = float(sample[rank])
        cands = torch.cat([_squares_at_least(f, threshold) for f in flats])
        if rank == sample.numel() - 1 or float(cands.sum()) >= target:
            break  # (at the sample's smallest value: fall back to every element below)
        rank = min(sample.numel() - 1, 2 * rank + 64)
    if float(cands.sum()) < target:
        cands = torch.cat([f.double() ** 2 for f in flats])
    return _count_in(cands, target)


CHUNK = 4096


def _energy(flat: torch.Tensor) -> float:
    """Sum of squares: float32 sums of 4096-element rows added in float64 (a relative error
    of ~1e-6 where one float32 dot over 10M elements is off by ~1e-4, at ~4 ms per 1M)."""
    n = flat.numel() - flat.numel() % CHUNK
    rows = flat[:n].view(-1, CHUNK)
    tail = flat[n:].double()
    return float(torch.einsum("ij,ij->i", rows, rows).double().sum()) + float(tail @ tail)


def _count_in(squares: torch.Tensor, target: float) -> int:
    """How many of the largest ``squares`` (float64) reach ``target``."""
    ordered = torch.sort(squares, descending=True).values
    cum = torch.cumsum(ordered, 0)
    k = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))) + 1
    return min(k, int(torch.count_nonzero(ordered)))


def _sample_sq(flats: Sequence[torch.Tensor], wanted: int,
               generator: torch.Generator | None) -> torch.Tensor:
    """Squares at random positions (each tensor its share), sorted descending, float64."""
    total = sum(f.numel() for f in flats)
    parts = []
    for f in flats:
        share = max(1, round(wanted * f.numel() / total)) if f.numel() else 0
        if share:
            where = generator.device if generator is not None else f.device
            pos = torch.randint(f.numel(), (share,), generator=generator, device=where)
            parts.append(f[pos.to(f.device)].double().cpu() ** 2)
    return torch.sort(torch.cat(parts), descending=True).values


def _squares_at_least(flat: torch.Tensor, threshold: float) -> torch.Tensor:
    """float64 squares of the entries whose square is >= ``threshold`` (on the host)."""
    mags = flat.abs()
    return mags[mags >= math.sqrt(threshold)].double().cpu() ** 2


def select_energy(flats: Sequence[torch.Tensor], config: TopKConfig,
                  generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Indices kept by an ``energy:`` stage, per tensor of ``flats`` (sorted, int64)."""
    fraction = config.energy
    if fraction is None:
        raise ValueError(f"{config} is not an energy selection")
    if config.scope is not Scope.GLOBAL:
        return [select_count([f], energy_count([f], fraction, generator))[0] for f in flats]
    chosen = select_count(flats, energy_count(flats, fraction, generator))
    if not config.floor:
        return chosen
    # Each tensor's share of the global selection is a prefix of its own magnitude order,
    # and so is its floor: the union is the longer prefix.
    out = []
    for f, idx in zip(flats, chosen, strict=True):
        need = energy_count([f], config.floor, generator)
        out.append(idx if idx.numel() >= need else select_count([f], need)[0])
    return out


__all__ = ["energy_count", "select_energy"]
