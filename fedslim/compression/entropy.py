"""Entropy coding of quantized value codes (the ``ans`` stage): rANS over the codes' histogram.

The codes that ``q:B`` produces for a heavy-tailed update are far from uniform, so writing
each in ``B`` bits wastes most of them. This stage writes a record's codes as::

    ceil(2**B / 8)  bitmap of the codes that occur (bit i of byte i // 8, LSB first)
    m x varint      how many times each of those m codes occurs (sums to the record's count)
    4*n bytes       the rANS stream (little-endian uint32 words) of the codes, coded under
                    the categorical model count/total of that histogram

using ``constriction``'s ANS coder (Rust, vectorised; no Python loop over elements). Both
sides build the model from the same integer histogram, so it is identical without sending
probabilities. The encoder keeps this form only where it is smaller than the bit-packed
codes; the wire records which form each tensor uses.

Decoding checks everything a hostile sender controls: the histogram must sum to the count
the record declares, the word stream must be whole words and no longer than the packed
codes would be, the decoder must end exactly empty, and the decoded codes must reproduce
the histogram. Any failure is a :class:`~fedslim.errors.DecodeError`.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from fedslim.errors import DecodeError, EncodeError


def _constriction() -> ModuleType | None:
    try:
        import constriction
    except ImportError:  # the GPU box may have only torch
        return None
    return constriction


def available() -> bool:
    """Whether the entropy coder can run here."""
    return _constriction() is not None


def _varints(values: np.ndarray) -> bytes:
    out = bytearray()
    for v in values.tolist():  # <= 256 histogram entries, not tensor elements
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def _read_varints(data: memoryview, n: int, where: str) -> tuple[np.ndarray, int]:
    values, pos = np.zeros(n, dtype=np.int64), 0
    for i in range(n):  # <= 256 entries
        value = shift = 0
        while True:
            if pos >= len(data):
                raise DecodeError(f"{where}: entropy-coded values end inside the histogram")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if byte == 0 and shift:
                    raise DecodeError(f"{where}: non-minimal varint in the histogram")
                break
            shift += 7
            if shift > 56:
                raise DecodeError(f"{where}: histogram entry longer than 8 bytes")
        values[i] = value
    return values, pos


def _model(constriction: ModuleType, hist: np.ndarray) -> object:
    probabilities = hist.astype(np.float64) / float(hist.sum())
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def encode_codes(codes: np.ndarray, bits: int) -> bytes:
    """The entropy-coded form of ``codes`` (uint8, each < 2**bits, at least one)."""
    constriction = _constriction()
    if constriction is None:
        raise EncodeError("spec asks for 'ans' but the 'constriction' package is not installed")
    hist = np.bincount(codes, minlength=1 << bits)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(codes.astype(np.int32, copy=False), _model(constriction, hist))
    words = coder.get_compressed().astype("<u4", copy=False)
    present = np.packbits(hist > 0, bitorder="little")
    return present.tobytes() + _varints(hist[hist > 0]) + words.tobytes()


def decode_codes(data: np.ndarray, bits: int, count: int, where: str) -> np.ndarray:
    """The ``count`` codes (uint8) of an entropy-coded values section, fully checked."""
    constriction = _constriction()
    if constriction is None:
        raise DecodeError(f"{where}: entropy-coded values but the 'constriction' package is "
                          "not installed")
    view = memoryview(np.ascontiguousarray(data, dtype=np.uint8).tobytes())
    width = max(1, (1 << bits) // 8)
    if len(view) < width:
        raise DecodeError(f"{where}: entropy-coded values end inside the histogram")
    present = np.unpackbits(np.frombuffer(view[:width], np.uint8), bitorder="little")
    if present[1 << bits:].any():
        raise DecodeError(f"{where}: histogram marks codes beyond {bits} bits")
    present = present[: 1 << bits].astype(bool)
    counts, used = _read_varints(view[width:], int(present.sum()), where)
    used += width
    if (counts == 0).any():
        raise DecodeError(f"{where}: histogram lists a code that occurs 0 times")
    hist = np.zeros(1 << bits, dtype=np.int64)
    hist[present] = counts
    if int(hist.sum()) != count or count < 1:
        raise DecodeError(f"{where}: entropy histogram sums to {int(hist.sum())}, the record "
                          f"declares {count} values")
    rest = len(view) - used
    if rest % 4:
        raise DecodeError(f"{where}: rANS stream is {rest} bytes, not whole 32-bit words")
    words = np.frombuffer(view[used:], dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        codes = coder.decode(_model(constriction, hist), count)
        empty = coder.is_empty()
    except Exception as exc:  # constriction raises plain errors on inconsistent streams
        raise DecodeError(f"{where}: corrupt rANS stream ({type(exc).__name__}: {exc})") \
            from None
    codes = np.asarray(codes)
    if not empty or codes.shape != (count,) or not np.array_equal(
            np.bincount(codes, minlength=1 << bits)[: 1 << bits], hist) \
            or int(codes.max()) >= 1 << bits:
        raise DecodeError(f"{where}: rANS stream does not decode to its histogram")
    return codes.astype(np.uint8)


def empirical_entropy_bytes(codes: np.ndarray, bits: int) -> float:
    """count x H(codes) / 8: what an ideal coder of this histogram needs (no model cost)."""
    hist = np.bincount(codes, minlength=1 << bits).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    p = hist[hist > 0] / total
    return float(-(hist[hist > 0] * np.log2(p)).sum() / 8.0)


__all__ = ["available", "decode_codes", "empirical_entropy_bytes", "encode_codes"]
