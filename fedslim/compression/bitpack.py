"""Fixed-width bit packing: ``count`` unsigned integers of ``bits`` bits each, MSB first.

The stream order is the one :func:`numpy.packbits` uses (bit ``i`` of the stream is bit
``7 - i % 8`` of byte ``i // 8``), each integer written most-significant bit first. Padding
bits in the last byte are zero, and the unpackers insist on that, so every value has exactly
one encoding. Everything is vectorised over the whole array; widths 1, 2, 4 and 8 -- the
common quantizer widths -- take shift-and-or fast paths instead of materialising bit planes.
"""

from __future__ import annotations

import numpy as np

from fedslim.errors import DecodeError


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` values of ``bits`` bits."""
    return (count * bits + 7) // 8


def _lanes(bits: int) -> int:
    return 8 // bits if bits in (1, 2, 4, 8) else 0


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 ``codes`` (each < ``2**bits``, 1 <= bits <= 8) into bytes.

    Parameters
    ----------
    codes : numpy.ndarray
        1-D uint8 array; values must already fit in ``bits`` bits.
    bits : int
        Width of each code, 1..8.
    """
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 1:
        return np.packbits(codes.astype(np.bool_, copy=False))
    lanes = _lanes(bits)
    if lanes:
        pad = (-codes.size) % lanes
        if pad:
            codes = np.concatenate([codes, np.zeros(pad, dtype=np.uint8)])
        grid = codes.reshape(-1, lanes)
        out = grid[:, 0] << np.uint8(8 - bits)
        for lane in range(1, lanes):
            out |= grid[:, lane] << np.uint8(8 - bits * (lane + 1))
        return out
    return pack_uint(codes.astype(np.int64), bits)


def unpack_codes(buf: np.ndarray, bits: int, count: int, what: str) -> np.ndarray:
    """Inverse of :func:`pack_codes`; ``buf`` must be exactly ``packed_size(count, bits)``.

    Raises
    ------
    DecodeError
        If the length is wrong or a padding bit is set (``what`` names the section).
    """
    _check_len_and_padding(buf, bits, count, what)
    if bits == 8:
        return buf.copy()
    if bits == 1:
        return np.unpackbits(buf, count=count)
    lanes = _lanes(bits)
    if lanes:
        out = np.empty(buf.size * lanes, dtype=np.uint8)
        mask = np.uint8((1 << bits) - 1)
        for lane in range(lanes):
            np.bitwise_and(buf >> np.uint8(8 - bits * (lane + 1)), mask, out=out[lane::lanes])
        return out[:count]
    return unpack_uint(buf, bits, count, what).astype(np.uint8)


def pack_uint(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative int64 ``values`` (each < ``2**bits``, bits <= 62) into bytes."""
    if bits == 0 or values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    planes = ((values[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1))


def unpack_uint(buf: np.ndarray, bits: int, count: int, what: str) -> np.ndarray:
    """Inverse of :func:`pack_uint`, returning int64; validates length and padding."""
    _check_len_and_padding(buf, bits, count, what)
    if bits == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    planes = np.unpackbits(buf, count=count * bits).reshape(count, bits)
    weights = np.left_shift(np.int64(1), np.arange(bits - 1, -1, -1, dtype=np.int64))
    out = np.zeros(count, dtype=np.int64)
    for plane in range(bits):  # at most 62 planes: loop over bit positions, not elements
        out += planes[:, plane].astype(np.int64) * weights[plane]
    return out


def _check_len_and_padding(buf: np.ndarray, bits: int, count: int, what: str) -> None:
    expected = packed_size(count, bits)
    if buf.size != expected:
        raise DecodeError(f"{what}: {buf.size} bytes, expected {expected} "
                          f"for {count} values of {bits} bits")
    used = (count * bits) % 8
    if used and int(buf[-1]) & ((1 << (8 - used)) - 1):
        raise DecodeError(f"{what}: padding bits of the last byte are not zero")
