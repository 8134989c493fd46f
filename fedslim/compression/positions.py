"""Position coding: where the kept values of a sparse tensor sit.

Sending int32 indices costs 32 bits per kept value; the information needed is only
``log2 C(n, k) / k`` bits (about ``log2(e n / k)``: ~8.1 bits at 1% density). Two codes get
close to that bound in opposite regimes, and ``auto`` picks whichever is smaller per tensor:

* **bitmap** -- one bit per element: optimal near 50% density, and what DGC's warm-up phase
  (25% density) needs;
* **golomb** -- Golomb-Rice code of the gaps ``g_i = idx_i - idx_{i-1} - 1``, optimal for
  geometric gaps (uniformly scattered indices): each gap is ``q = g >> r`` in unary plus the
  low ``r`` bits. The Rice parameter ``r`` is the exact minimiser of the coded size over the
  few candidates near ``log2(mean gap)``.

Layout of the golomb section: one bit stream, zero-padded to a byte at its end: all ``k``
remainders first (``k*r`` bits, MSB first), then the unary part (``q_i`` zero bits then a one
bit per index). Putting the remainders apart from the unary part is what lets the decoder run
vectorised: the ones of the unary part are exactly the code-word terminators. Because gaps are
non-negative, any decodable stream yields strictly increasing indices, so unsorted or duplicated
indices cannot be expressed; the decoder checks the count, the range and the canonical padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from fedslim.compression.bitpack import packed_size
from fedslim.compression.spec import PositionCoding
from fedslim.errors import DecodeError

MAX_RICE_PARAM = 62
RICE_CHUNK_BYTES = 1 << 11  # unary bytes per step of iter_rice (<= 16,384 code words)


class PositionCodec(IntEnum):
    """Wire identifiers of position codes (one byte in each tensor record)."""

    ALL = 0  # every element kept: no position data at all
    BITMAP = 1
    RICE = 2
    LOWRANK = 3  # no positions: the values are rank-R factors (param = R), see lowrank.py


@dataclass(frozen=True)
class EncodedPositions:
    codec: PositionCodec
    param: int  # the Rice parameter r (0 for other codecs)
    data: np.ndarray  # uint8


def _gaps(idx: np.ndarray) -> np.ndarray:
    return np.diff(idx, prepend=np.int64(-1)) - 1


def rice_size(gaps: np.ndarray, r: int) -> int:
    """Exact byte size of the golomb section for ``gaps`` with parameter ``r``."""
    k = gaps.size
    return (k * (r + 1) + int(np.sum(gaps >> r)) + 7) // 8


def rice_size_range(count: int, numel: int, r: int) -> tuple[int, int]:
    """Smallest and largest golomb section a valid (count, numel, r) can have."""
    if count == 0:
        return 0, 0
    return (count * (r + 1) + 7) // 8, (count * (r + 1) + (numel >> r) + 7) // 8


def best_rice_param(gaps: np.ndarray) -> tuple[int, int]:
    """``(r, size)`` minimising :func:`rice_size` over r near log2 of the mean gap."""
    if gaps.size == 0:
        return 0, 0
    mean = float(gaps.mean())
    centre = int(np.floor(np.log2(mean))) if mean >= 1.0 else 0
    candidates = range(max(0, centre - 1), min(MAX_RICE_PARAM, centre + 2) + 1)
    return min(((r, rice_size(gaps, r)) for r in candidates), key=lambda rs: rs[1])


def encode_positions(idx: np.ndarray, numel: int, coding: PositionCoding) -> EncodedPositions:
    """Code sorted, unique int64 indices ``idx`` of a tensor with ``numel`` elements.

    ``ALL`` is used whenever every element is kept, whatever ``coding`` asks for: no bits are
    needed then. Otherwise ``coding`` picks the code, ``AUTO`` the smaller of the two.
    """
    k = idx.size
    if k == numel:
        return EncodedPositions(PositionCodec.ALL, 0, np.zeros(0, dtype=np.uint8))
    bitmap_size = packed_size(numel, 1)
    if coding is PositionCoding.BITMAP:
        return _encode_bitmap(idx, numel)
    gaps = _gaps(idx)
    r, size = best_rice_param(gaps)
    if coding is PositionCoding.AUTO and bitmap_size < size:
        return _encode_bitmap(idx, numel)
    return _encode_rice(gaps, r)


def _encode_bitmap(idx: np.ndarray, numel: int) -> EncodedPositions:
    mask = np.zeros(numel, dtype=np.bool_)
    mask[idx] = True
    return EncodedPositions(PositionCodec.BITMAP, 0, np.packbits(mask))


def _encode_rice(gaps: np.ndarray, r: int) -> EncodedPositions:
    k = gaps.size
    if k == 0:
        return EncodedPositions(PositionCodec.RICE, r, np.zeros(0, dtype=np.uint8))
    terminators = np.cumsum((gaps >> r) + 1) - 1
    stream = np.zeros(k * r + int(terminators[-1]) + 1, dtype=np.uint8)
    if r:
        shifts = np.arange(r - 1, -1, -1, dtype=np.int64)
        stream[:k * r] = ((gaps[:, None] >> shifts) & 1).reshape(-1)
    stream[k * r + terminators] = 1
    return EncodedPositions(PositionCodec.RICE, r, np.packbits(stream))


def decode_positions(codec: PositionCodec, param: int, data: np.ndarray, count: int,
                     numel: int, where: str) -> np.ndarray | None:
    """Decode and validate indices; ``None`` means every element (codec ``ALL``).

    Allocation is bounded by the section's actual length (8 bytes per bit at most) and by
    ``numel``, which the caller has already checked against its element limit.

    Raises
    ------
    DecodeError
        On any inconsistency: wrong count, index out of range, bad padding, trailing bytes.
    """
    if codec is PositionCodec.ALL:
        if count != numel or data.size:
            raise DecodeError(f"{where}: 'all' positions need count == numel and no data "
                              f"(count {count}, numel {numel}, {data.size} bytes)")
        return None
    if count > numel:
        raise DecodeError(f"{where}: {count} kept values but only {numel} elements")
    if codec is PositionCodec.BITMAP:
        return _decode_bitmap(data, count, numel, where)
    return _decode_rice(data, param, count, numel, where)


def bitmap_mask(data: np.ndarray, count: int, numel: int, where: str) -> np.ndarray:
    """A bitmap section as one uint8 (0/1) per element, checked to mark ``count`` of them
    (1 byte per element: no index array)."""
    if data.size != packed_size(numel, 1):
        raise DecodeError(f"{where}: bitmap is {data.size} bytes, expected "
                          f"{packed_size(numel, 1)} for {numel} elements")
    if numel % 8 and int(data[-1]) & ((1 << (8 - numel % 8)) - 1):
        raise DecodeError(f"{where}: bitmap padding bits are not zero")
    if count > numel:
        raise DecodeError(f"{where}: {count} kept values but only {numel} elements")
    mask = np.unpackbits(data, count=numel)
    marked = int(np.count_nonzero(mask))
    if marked != count:
        raise DecodeError(f"{where}: bitmap marks {marked} positions, header says {count}")
    return mask


def _decode_bitmap(data: np.ndarray, count: int, numel: int, where: str) -> np.ndarray:
    return np.flatnonzero(bitmap_mask(data, count, numel, where)).astype(np.int64, copy=False)


def _decode_rice(data: np.ndarray, r: int, count: int, numel: int, where: str) -> np.ndarray:
    parts = [idx for _, idx in iter_rice(data, r, count, numel, where)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def iter_rice(data: np.ndarray, r: int, count: int, numel: int, where: str
              ) -> Iterator[tuple[int, np.ndarray]]:
    """A golomb section's indices a chunk at a time: ``(first code word, indices)``.

    The same indices and checks as :func:`decode_positions` (RICE), but the unary stream
    is read ``RICE_CHUNK_BYTES`` at a time, so a section of ``count`` positions costs
    O(chunk) memory instead of ~40 bytes per position; the caller scatters each chunk.
    """
    if r > MAX_RICE_PARAM:
        raise DecodeError(f"{where}: Rice parameter {r} > {MAX_RICE_PARAM}")
    low, high = rice_size_range(count, numel, r)
    if not low <= data.size <= high:
        raise DecodeError(f"{where}: golomb section is {data.size} bytes, expected "
                          f"{low}..{high} for {count} of {numel} elements")
    if count > numel:
        raise DecodeError(f"{where}: {count} kept values but only {numel} elements")
    if count == 0:
        return
    split = count * r
    ubyte, ubit = divmod(split, 8)
    done, last, prev = 0, -1, -1  # code words so far, last index, last terminator bit
    for b in range(ubyte, data.size, RICE_CHUNK_BYTES):
        bits = np.unpackbits(data[b:b + RICE_CHUNK_BYTES])
        base = (b - ubyte) * 8 - ubit
        if b == ubyte:
            bits, base = bits[ubit:], 0
        terms = np.flatnonzero(bits) + base  # terminator offsets in the unary stream
        if not terms.size:
            continue
        n = int(terms.size)
        if done + n > count:
            raise DecodeError(f"{where}: golomb unary stream has at least {done + n} code "
                              f"words, header says {count}")
        gaps = (np.diff(terms, prepend=np.int64(prev)) - 1)
        if int(gaps.max()) > (numel >> r):
            raise DecodeError(f"{where}: golomb gap exceeds the tensor size {numel}")
        gaps <<= r
        if r:
            first = done * r
            rem_bits = np.unpackbits(data[first // 8:((done + n) * r + 7) // 8])
            rem = rem_bits[first % 8:first % 8 + n * r].reshape(n, r)
            for plane in range(r):  # at most 62 bit planes, vectorised over the chunk
                gaps |= rem[:, plane].astype(np.int64) << (r - 1 - plane)
        if int(gaps.max()) >= numel:
            raise DecodeError(f"{where}: golomb indices run past the tensor size {numel}")
        gaps += 1
        idx = np.cumsum(gaps, out=gaps)
        idx += last
        if int(idx[-1]) >= numel:
            raise DecodeError(f"{where}: golomb indices run past the tensor size {numel}")
        yield done, idx
        done, last, prev = done + n, int(idx[-1]), int(terms[-1])
    if done != count:
        raise DecodeError(f"{where}: golomb unary stream has {done} code words, "
                          f"header says {count}")
    if (split + prev) // 8 != data.size - 1:
        raise DecodeError(f"{where}: trailing bytes after the golomb unary stream")
