"""Allocation of large host buffers, and a fast finiteness check.

On Linux, NumPy asks for transparent huge pages for big arrays while PyTorch's CPU allocator
does not; first-touching a fresh 40 MB torch tensor then costs ~4x more page faults than the
same NumPy array (measured 13 ms vs 3 ms for 10M float32 on the dev box). The codecs make a few
full-size buffers per tensor (masks, dense outputs), so on CPU they are allocated through NumPy
and wrapped with ``torch.from_numpy`` (no copy). Other devices use torch directly.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import numpy as np
import torch

_NUMPY_DTYPES: dict[torch.dtype, type[np.generic]] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.uint8: np.uint8,
    torch.int64: np.int64,
    torch.bool: np.bool_,
}


def empty(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised 1-D tensor of ``n`` elements."""
    if device.type == "cpu" and dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.empty(n, dtype=_NUMPY_DTYPES[dtype]))
    return torch.empty(n, dtype=dtype, device=device)


def like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``t``'s shape, dtype and device: an ``out=`` target that
    faults in as huge pages on CPU (a fresh torch result of 10M float32 costs 14 ms here,
    this 5 ms)."""
    return empty(t.numel(), t.dtype, t.device).view(t.shape)


def fits(buf: torch.Tensor | None, numel: int, dtype: torch.dtype,
         device: torch.device) -> bool:
    """Whether ``buf`` can take ``numel`` elements of ``dtype`` on ``device`` in place
    (contiguous, so any shape of that size is a view of it)."""
    return buf is not None and buf.numel() == numel and buf.dtype == dtype \
        and buf.device == device and buf.is_contiguous()


_SCRATCH = threading.local()


def scratch(role: str, model: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Uninitialised buffers shaped like ``model``'s tensors (name -> tensor), kept per thread and
    ``role`` and handed out again on the next call with the same names, shapes, dtypes and
    devices: a node's model-sized per-round buffers are faulted in once per process
    instead of every round (in a long-lived worker, where memory is fragmented, a fresh
    40 MB buffer cost ~48 ms here, a reused one nothing). Another model replaces the
    role's buffers, so a role holds at most one model's worth.

    The caller must be done with what the previous call for ``role`` returned, and must
    not hand these tensors to anyone who keeps them.
    """
    pool: dict[str, tuple[tuple[object, ...], dict[str, torch.Tensor]]] = \
        _SCRATCH.__dict__.setdefault("pool", {})
    signature = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in model.items())
    held = pool.get(role)
    if held is None or held[0] != signature:
        pool.pop(role, None)  # (release the old buffers before allocating new ones)
        held = (signature, {k: like(v) for k, v in model.items()})
        pool[role] = held
    return dict(held[1])


def zeros(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled 1-D tensor of ``n`` elements (lazily zeroed pages on CPU)."""
    if device.type == "cpu" and dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.zeros(n, dtype=_NUMPY_DTYPES[dtype]))
    return torch.zeros(n, dtype=dtype, device=device)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: one ``aminmax`` pass (a NaN anywhere makes both
    NaN, an Inf shows as an extreme). ~20x faster than ``isfinite(t).all()`` on CPU (1.5 vs
    42 ms for 10M float32 here): no boolean buffer, no dtype conversion."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    return math.isfinite(float(lo)) and math.isfinite(float(hi))
