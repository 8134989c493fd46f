"""``budget:``: as many kept values as fit a byte budget, chosen by magnitude across tensors.

Keeping the k largest magnitudes over all tensors minimises the squared error of the
sparsified update for a given k; what a value costs on the wire is nearly the same
everywhere (its code plus ~log2(n/k) bits of position), so filling the budget greedily by
magnitude is the water-filling allocation of a byte budget across tensors. The payload size
is, to within a few bytes, ``fixed + k * per_value``; :func:`encode_within` measures it
at two points, solves for k, and corrects on the real encoding until it fits -- a handful
of encodes (each a full selection, O(n)), never a search over k one by one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fedslim.compression.spec import PipelineSpec, QuantizeConfig, SignConfig
from fedslim.errors import EncodeError

Encoded = tuple[bytes, dict[str, torch.Tensor]]
MAX_TRIES = 12


def _value_bits(spec: PipelineSpec) -> float:
    values = spec.values
    if isinstance(values, QuantizeConfig):
        return float(values.bits)
    return 1.0 if isinstance(values, SignConfig) else 16.0


def encode_within(encode: Callable[[int], Encoded], limit: int, pool: int,
                  spec: PipelineSpec) -> Encoded:
    """The encoding with the largest k (within a value or two) whose payload is <= ``limit``.

    ``encode(k)`` encodes with the k largest magnitudes of the ``pool`` selectable values.

    Raises
    ------
    EncodeError
        If even one kept value does not fit: the fixed part (header, names and shapes or
        the schema digest, per-tensor fields, passthrough tensors) is over the budget.
    """
    if pool == 0:  # nothing to select: every tensor is a passthrough
        out = encode(1)
        return _check(out, limit, 0)
    first = encode(1)
    fixed = len(first[0])
    if fixed > limit:
        raise EncodeError(f"a budget of {limit} bytes is below this update's fixed cost "
                          f"({fixed} bytes with one value kept: header, per-tensor fields and "
                          "the passthrough tensors); raise the budget or lower pass:")
    guess = max(1, min(pool, math.floor(8 * (limit - fixed)
                                        / (_value_bits(spec) + 2 + math.log2(pool)))))
    best, best_k = first, 1
    k, lo, hi = guess, 1, pool + 1  # invariant: size(lo) fits, size(hi) does not
    for _ in range(MAX_TRIES):
        if k <= lo or k >= hi:
            break
        out = encode(k)
        size = len(out[0])
        per_value = max((size - fixed) / max(k - 1, 1), 0.125)
        if size <= limit:
            best, best_k, lo = out, k, k
            if limit - size < 2 * per_value or k == pool:
                break
            k = min(hi - 1, k + max(1, math.floor((limit - size) / per_value)))
        else:
            hi = k
            k = max(lo + 1, k - max(1, math.ceil((size - limit) / per_value)))
            if k >= hi:
                k = (lo + hi) // 2
    return _check(best, limit, best_k)


def _check(out: Encoded, limit: int, k: int) -> Encoded:
    if len(out[0]) > limit:
        raise EncodeError(f"could not fit the update into {limit} bytes (best: "
                          f"{len(out[0])} bytes with {k} values)")
    return out
