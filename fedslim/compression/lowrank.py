"""``lowrank:R``: PowerSGD-style rank-R factors of each matrix-shaped update.

A tensor of shape ``(m, ...)`` is viewed as an ``m x n`` matrix (conv kernels: ``n`` =
in-channels x kernel size). One power iteration (Vogels et al., PowerSGD, 2019) from a
starting ``Q`` (``n x R``)::

    P = orthonormalize(M Q)        # m x R
    Q = M^T P                      # n x R;  M ~ P Q^T

``P`` and ``Q`` are sent, concatenated (``R (m + n)`` values), through the pipeline's value
stage (``q:B``, ``fp16``, plain ``fp32``). Each column pair is rescaled first so their
entries have the same typical size: ``P Q^T`` is unchanged and one quantization scale
serves both. ``Q`` is warm-started from the previous round's when the caller keeps a state
for it (the client mod does, in ``context.state``); the first round, or a shape change,
starts from a seeded Gaussian. Error feedback (in the caller) carries what the rank-R
approximation left out into the next round, as in PowerSGD.

A matrix where ``R (m + n) >= m n`` (small or thin tensors) and 1-D tensors are sent dense
through the value stage instead. The reconstruction ``P Q^T`` is computed as a fixed-order
sum of R outer products with separate multiply and add (no matmul blocking, no fused
multiply-add), so encoder and decoder produce the same float32 bits on any machine.
"""

from __future__ import annotations

import numpy as np
import torch

from fedslim.compression.buffers import all_finite
from fedslim.errors import DecodeError, EncodeError

MAX_RANK = 63  # the rank rides in the 6-bit parameter field of the position byte


def matrix_shape(shape: tuple[int, ...], numel: int) -> tuple[int, int] | None:
    """``(m, n)`` for a tensor of ``shape``; ``None`` for fewer than two dimensions."""
    if len(shape) < 2 or numel == 0:
        return None
    return shape[0], numel // shape[0]


def factor_count(shape: tuple[int, ...], numel: int, rank: int) -> int | None:
    """Values sent for a rank-``rank`` factorisation, or ``None`` if dense is not larger."""
    mn = matrix_shape(shape, numel)
    if mn is None:
        return None
    m, n = mn
    r = min(rank, m, n)
    return r * (m + n) if r * (m + n) < m * n else None


def factorize(flat: torch.Tensor, shape: tuple[int, ...], rank: int,
              warm: torch.Tensor | None, generator: torch.Generator | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, next_q)``: ``P`` then ``Q`` flattened (row-major), and ``Q`` to keep."""
    mn = matrix_shape(shape, flat.numel())
    assert mn is not None
    m, n = mn
    r = min(rank, m, n)
    matrix = flat.view(m, n)
    if warm is not None and tuple(warm.shape) == (n, r):
        q = warm.to(device=flat.device, dtype=torch.float32)
    else:
        gen_device = generator.device if generator is not None else flat.device
        q = torch.randn(n, r, generator=generator, device=gen_device).to(flat.device)
    p = matrix @ q
    p, _ = torch.linalg.qr(p, mode="reduced")  # orthonormal columns
    q = matrix.T @ p
    # Balance each column pair (P Q^T is unchanged) so one quantization scale suits both:
    # P's columns have unit norm, Q's carry the whole magnitude.
    norms = q.double().norm(dim=0)  # float64: squares of large updates overflow float32
    gain = (norms * (m / max(n, 1)) ** 0.5).clamp_min(1e-30).sqrt().to(q.dtype)
    values = torch.cat([(p * gain).reshape(-1), (q / gain).reshape(-1)])
    if not all_finite(values):
        raise EncodeError("low-rank factors overflow float32 (update magnitudes near the "
                          "float32 limit); use topk or a cast instead of lowrank")
    return values, q


ROW_CHUNK_ELEMENTS = 1 << 16  # rows per pass (256 KB of float32 scratch)


def reconstruct(values: torch.Tensor, shape: tuple[int, ...], numel: int, rank: int,
                where: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """``P Q^T`` as a flat float32 tensor, bit-identical wherever it runs.

    Every element is ``fl(...fl(fl(p0 q0) + fl(p1 q1)) ... + fl(p_r q_r))``, summed over
    the rank in order (no BLAS reduction, whose order differs between machines). The rows
    are done a block at a time with one reused scratch block, so the cost beyond the
    result is ~256 KB, and the result goes into ``out`` when it is a float32 buffer of
    ``numel`` elements.
    """
    mn = matrix_shape(shape, numel)
    if mn is None:
        raise DecodeError(f"{where}: low-rank factors need a tensor of 2+ dimensions")
    m, n = mn
    r = min(rank, m, n)
    if values.numel() != r * (m + n):
        raise DecodeError(f"{where}: {values.numel()} factor values, rank {r} of a {m}x{n} "
                          f"matrix needs {r * (m + n)}")
    p = values[: m * r].view(m, r)
    qt = values[m * r:].view(n, r).t().contiguous()  # (r, n): row j is column j of Q
    if out is not None and out.dtype == torch.float32 and out.is_contiguous() \
            and out.numel() == numel and out.device == values.device:
        dense = out.view(m, n)
    else:
        dense = torch.empty(m, n, dtype=torch.float32, device=values.device)
    rows = max(1, min(m, ROW_CHUNK_ELEMENTS // max(n, 1)))
    if values.device.type == "cpu":  # numpy: the same IEEE products and sums, one thread
        # (torch's intra-op threads pay a barrier per op: seconds on a busy machine)
        _products_numpy(p.numpy(), qt.numpy(), dense.numpy(), rows)
        return dense.view(-1)
    scratch = torch.empty(rows, n, dtype=torch.float32, device=values.device)
    for a in range(0, m, rows):  # over row blocks and the rank, never over elements
        b = min(m, a + rows)
        acc, tmp = dense[a:b], scratch[: b - a]
        torch.mul(p[a:b, 0:1], qt[0], out=acc)
        for j in range(1, r):
            torch.mul(p[a:b, j:j + 1], qt[j], out=tmp)
            acc.add_(tmp)
    return dense.view(-1)


def _products_numpy(p: np.ndarray, qt: np.ndarray, dense: np.ndarray, rows: int) -> None:
    m, r = p.shape
    scratch = np.empty((rows, qt.shape[1]), dtype=np.float32)
    for a in range(0, m, rows):
        b = min(m, a + rows)
        acc, tmp = dense[a:b], scratch[: b - a]
        np.multiply(p[a:b, 0:1], qt[0], out=acc)
        for j in range(1, r):
            np.multiply(p[a:b, j:j + 1], qt[j], out=tmp)
            np.add(acc, tmp, out=acc)


__all__ = ["MAX_RANK", "factor_count", "factorize", "matrix_shape", "reconstruct"]
