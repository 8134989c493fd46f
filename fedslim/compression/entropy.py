"""Entropy coding of quantized value codes (the ``ans`` stage): rANS under a sent model.

The codes that ``q:B`` produces for a heavy-tailed update are far from uniform, so writing
each in ``B`` bits wastes most of them. The encoder keeps the entropy-coded form only
where it is smaller than the bit-packed codes; the wire records which form each tensor
uses. Two forms, chosen by the record's count (the decoder knows it):

**Fewer than** ``LANE_MIN`` **(2^20) codes** -- a small model, then one rANS stream::

    bit fields, LSB first, zero-padded to a byte:
        4 bits      b, 0..8: bits per model entry (0 when one code occurs)
        2^B bits    which codes occur (bit i: code i occurs at least once)
        m x b bits  for each of the m occurring codes, in order, t - 1 (t in 1..2^b)
    the rANS stream: little-endian uint32 words of ``constriction``'s ANS coder (Rust, no
    Python loop over elements), the last word's zero high bytes left out (so the section
    never ends in a zero byte; the decoder pads the word back; a very likely sequence can
    take no word at all)

under the categorical model ``p(code) = t^2 / sum(t^2)`` over the occurring codes (``b =
0``: all equally likely; one occurring code: no stream at all), with ``t = rint(sqrt(c /
c_max) 2^b)`` clipped to 1..2^b for the codes' counts ``c``: the decoder recomputes ``t``
from what it decoded and rejects any other, so a code sequence has one encoding per width
``b`` (the encoder's choice, the one minimising model bits plus the stream's estimated
bits: floating-point logs, which the decoder does not repeat). Quantizing ``sqrt(p)`` on a
uniform grid is what the multinomial's Fisher metric calls uniform, so ``b`` bits per code
buy the most accuracy where it matters. (A width implied by the count alone, about
log2(count)/2 - 2, was tried: fully canonical and 4 bits shorter, but 1.069-1.074x instead
of 1.046-1.050x on the digits CNN's records, which are more peaked than that rule assumes.)
Sending the exact histogram instead cost 1.10x the codes' empirical entropy on the digits
CNN's 1% update (the counts, ~1.5 bytes each, and a 32-bit word of slack per tensor); a
coder that learns the distribution from the data pays, in the worst case, about
``(m-1)/2 log2(k/2 pi)`` bits over it.

**At least** ``LANE_MIN`` **codes** -- the exact histogram and interleaved rANS, in numpy::

    ceil(2**B / 8)  bitmap of the codes that occur (bit i of byte i // 8, LSB first)
    m x varint      how many times each of those m codes occurs (sums to the count)
    4*lanes bytes   each lane's final encoder state (little-endian uint32, in [2^16, 2^32))
    2*n bytes       the 16-bit renormalisation words (little-endian uint16), in the order
                    the decoder reads them: step by step, lane by lane

``lanes = ceil(count / LANE_STEPS)`` independent 32-bit rANS states (implied by the
count), code ``i`` in lane ``i % lanes``, all lanes advanced together -- at most
``LANE_STEPS`` (2,048) vectorised steps per record, each over every lane, so a hostile
record cannot make the decoder loop longer than that -- under the histogram's counts
scaled to ``2^15`` (every occurring code >= 1, the rounding difference given to the most
frequent code: integers only, identical on both sides). The decoder must read every word
and end with every lane back at ``2^16``. ~5x faster to decode than the single stream on
one core, at ~1% more bytes (the lanes' states); the histogram's bytes are negligible at
this size.

Decoding checks everything a hostile sender controls: the model's padding and entries, the
stream's canonical end, that the decoder ends exactly empty after ``count``
codes, and that the codes that occur are exactly the ones the model lists (with the
histogram: that the codes reproduce it). Any failure is a
:class:`~fedslim.errors.DecodeError`.
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


LANE_MIN = 1 << 20
"""Records with at least this many codes use the interleaved (lane) coder."""
LANE_STEPS = 2048
"""Codes per lane (the decoder's vectorised steps per record) of the lane coder."""
_PREC = 15                 # the lane coder's probability precision: counts scale to 2^15
_LOW = 1 << 16             # rANS state interval [2^16, 2^32), 16-bit renormalisation


def _lanes(count: int) -> int:
    return -(-count // LANE_STEPS)


def _scaled(hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies summing to 2^15, their starts): integer arithmetic only, so encoder and
    decoder derive the same model from the same histogram."""
    hist = hist.astype(np.int64)
    freq = np.where(hist > 0, np.maximum(1, (hist << _PREC) // int(hist.sum())), 0)
    top = int(np.argmax(hist))
    freq[top] += (1 << _PREC) - int(freq.sum())  # >= 1: rounding down favours the top code
    return freq, np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.int64)


def _lane_encode(codes: np.ndarray, hist: np.ndarray) -> bytes:
    freq, start = _scaled(hist)
    n, lanes = codes.size, _lanes(codes.size)
    x = np.full(lanes, _LOW, dtype=np.int64)
    symbols = codes.astype(np.int64)
    chunks: list[np.ndarray] = []
    for t in range(-(-n // lanes) - 1, -1, -1):  # reverse: the decoder reads forwards
        s = symbols[t * lanes:(t + 1) * lanes]
        xs, fs = x[:s.size], freq[s]
        emit = xs >= fs << (32 - _PREC)
        chunks.append(xs[emit].astype(np.uint16))  # (the low 16 bits)
        xs[emit] >>= 16
        q, r = np.divmod(xs, fs)
        x[:s.size] = (q << _PREC) + r + start[s]
    words = np.concatenate(chunks[::-1]) if chunks else np.zeros(0, np.uint16)
    return x.astype("<u4").tobytes() + words.astype("<u2").tobytes()


def _lane_decode(data: memoryview, hist: np.ndarray, count: int, where: str) -> np.ndarray:
    lanes = _lanes(count)
    if len(data) < 4 * lanes or (len(data) - 4 * lanes) % 2:
        raise DecodeError(f"{where}: lane-coded values need {lanes} 4-byte states and whole "
                          f"16-bit words, got {len(data)} bytes")
    x = np.frombuffer(data[:4 * lanes], dtype="<u4").astype(np.int64)
    if (x < _LOW).any():
        raise DecodeError(f"{where}: a lane state is below 2^16")
    words = np.frombuffer(data[4 * lanes:], dtype="<u2").astype(np.int64)
    freq, start = _scaled(hist)
    lut = np.repeat(np.arange(freq.size, dtype=np.int64), freq)  # slot -> code, 2^15 slots
    packed = freq << 16 | start
    out = np.empty(count, dtype=np.uint8)
    pos, mask = 0, (1 << _PREC) - 1
    for t in range(-(-count // lanes)):
        k = min(lanes, count - t * lanes)
        xs = x[:k]
        slot = xs & mask
        s = lut[slot]
        out[t * lanes:t * lanes + k] = s
        g = packed[s]
        xs = (g >> 16) * (xs >> _PREC) + slot - (g & 0xFFFF)
        need = np.flatnonzero(xs < _LOW)
        if need.size:
            if pos + need.size > words.size:
                raise DecodeError(f"{where}: lane-coded values end early")
            xs[need] = xs[need] << 16 | words[pos:pos + need.size]
            pos += need.size
        x[:k] = xs
    if pos != words.size or (x != _LOW).any():
        raise DecodeError(f"{where}: lane-coded values do not end where the stream does")
    return out


_B_FIELD = 4               # bits of the model's entry width field
_B_MAX = 8                 # widest model entry


def _bits_of(values: np.ndarray, width: int) -> np.ndarray:
    """Each value's ``width`` low bits, LSB first (a flat uint8 bit array)."""
    shifts = np.arange(width, dtype=np.int64)
    return ((values.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)


def _from_bits(bits: np.ndarray, width: int) -> np.ndarray:
    return (bits.reshape(-1, width).astype(np.int64) << np.arange(width)).sum(axis=1)


def _weights(t: np.ndarray, present: np.ndarray) -> np.ndarray:
    """The model over all codes: t^2 / sum(t^2) on the occurring ones, 0 elsewhere."""
    w = np.zeros(present.size, dtype=np.float64)
    w[present] = t.astype(np.float64) ** 2
    return w / w.sum()


def _choose_width(counts: np.ndarray) -> int:
    """The entry width minimising model bits + the stream's estimated bits (ties: the
    narrower). Only the encoder computes it (floating-point logs); the width travels."""
    best: tuple[float, int] | None = None
    for b in range(_B_MAX + 1):
        p = _entries(counts, b).astype(np.float64) ** 2
        bits = counts.size * b - float((counts * np.log2(p / p.sum())).sum())
        if best is None or bits < best[0] - 1e-9:
            best = (bits, b)
    assert best is not None
    return best[1]


def _entries(counts: np.ndarray, b: int) -> np.ndarray:
    """The model's entries for these (nonzero) counts: ``t = rint(sqrt(c / c_max) 2^b)``
    clipped to 1..2^b. Correctly rounded IEEE operations only (division, sqrt, a power of
    two, rint), so the decoder recomputes exactly what the encoder sent and can insist on
    it: one encoding per code sequence."""
    if b == 0:
        return np.ones(counts.size, np.int64)
    share = np.sqrt(counts.astype(np.float64) / float(counts.max()))
    return np.clip(np.rint(share * float(1 << b)), 1, 1 << b).astype(np.int64)


def _encode_small(codes: np.ndarray, bits: int) -> bytes:
    hist = np.bincount(codes, minlength=1 << bits)
    present = hist > 0
    counts = hist[present]
    b = _choose_width(counts) if counts.size > 1 else 0
    t = _entries(counts, b)
    fields = [_bits_of(np.array([b]), _B_FIELD), present.astype(np.uint8)]
    if b:
        fields.append(_bits_of(t - 1, b))
    head = np.packbits(np.concatenate(fields), bitorder="little").tobytes()
    if counts.size == 1:  # one code: the count says everything
        return head
    constriction = _constriction()
    if constriction is None:
        raise EncodeError("spec asks for 'ans' but the 'constriction' package is not installed")
    model = constriction.stream.model.Categorical(_weights(t, present), perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(codes.astype(np.int32, copy=False), model)
    stream = coder.get_compressed().astype("<u4", copy=False).tobytes()
    # constriction emits no zero top word (a head that fits in fewer words takes fewer;
    # a very likely sequence can take none), so only the top word's zero bytes go.
    stream = stream[:-4] + stream[-4:].rstrip(b"\0")
    if stream and stream[-1] == 0:
        raise EncodeError("rANS stream with a zero top word: cannot be written canonically")
    return head + stream


def _decode_small(view: memoryview, bits: int, count: int, where: str) -> np.ndarray:
    n = 1 << bits
    fixed = _B_FIELD + n
    if 8 * len(view) < fixed:
        raise DecodeError(f"{where}: entropy-coded values end inside the model")
    raw = np.unpackbits(np.frombuffer(view[:(fixed + 7) // 8], np.uint8), bitorder="little")
    b = int(_from_bits(raw[:_B_FIELD], _B_FIELD)[0])
    present = raw[_B_FIELD:fixed].astype(bool)
    m = int(present.sum())
    if m == 0:
        raise DecodeError(f"{where}: entropy model lists no code")
    if b > _B_MAX or (m == 1 and b):
        raise DecodeError(f"{where}: entropy model lists {m} codes with {b}-bit entries")
    total = fixed + m * b
    size = (total + 7) // 8
    if len(view) < size:
        raise DecodeError(f"{where}: entropy-coded values end inside the model")
    raw = np.unpackbits(np.frombuffer(view[:size], np.uint8), bitorder="little")
    if raw[total:].any():
        raise DecodeError(f"{where}: entropy model has non-zero padding bits")
    t = _from_bits(raw[fixed:total], b) + 1 if b else np.ones(m, np.int64)
    stream = view[size:]
    if m == 1:
        if len(stream):
            raise DecodeError(f"{where}: one code occurs, yet {len(stream)} stream bytes follow")
        return np.full(count, int(np.flatnonzero(present)[0]), dtype=np.uint8)
    if len(stream) and stream[-1] == 0:
        raise DecodeError(f"{where}: rANS stream ends in a zero byte")
    constriction = _constriction()
    if constriction is None:
        raise DecodeError(f"{where}: entropy-coded values but the 'constriction' package is "
                          "not installed")
    padded = bytes(stream) + bytes(-len(stream) % 4)
    words = np.frombuffer(padded, dtype="<u4").astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        model = constriction.stream.model.Categorical(_weights(t, present), perfect=False)
        codes = np.asarray(coder.decode(model, count))
        empty = coder.is_empty()
    except Exception as exc:  # constriction raises plain errors on inconsistent streams
        raise DecodeError(f"{where}: corrupt rANS stream ({type(exc).__name__}: {exc})") \
            from None
    if not empty or codes.shape != (count,) or int(codes.min()) < 0 \
            or int(codes.max()) >= n:
        raise DecodeError(f"{where}: rANS stream does not decode to the codes its model lists")
    hist = np.bincount(codes, minlength=n)[:n]
    if not np.array_equal(hist > 0, present):
        raise DecodeError(f"{where}: rANS stream does not decode to the codes its model lists")
    if not np.array_equal(_entries(hist[present], b), t):
        raise DecodeError(f"{where}: entropy model is not the one its codes imply")
    return codes.astype(np.uint8)


def encode_codes(codes: np.ndarray, bits: int) -> bytes:
    """The entropy-coded form of ``codes`` (uint8, each < 2**bits, at least one)."""
    if codes.size < LANE_MIN:
        return _encode_small(codes, bits)
    hist = np.bincount(codes, minlength=1 << bits)
    present = np.packbits(hist > 0, bitorder="little")
    return present.tobytes() + _varints(hist[hist > 0]) + _lane_encode(codes, hist)


def decode_codes(data: np.ndarray, bits: int, count: int, where: str) -> np.ndarray:
    """The ``count`` codes (uint8) of an entropy-coded values section, fully checked."""
    view = memoryview(np.ascontiguousarray(data, dtype=np.uint8).tobytes())
    if count < 1:
        raise DecodeError(f"{where}: entropy-coded values for {count} codes")
    if count < LANE_MIN:
        return _decode_small(view, bits, count, where)
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
    if int(hist.sum()) != count:
        raise DecodeError(f"{where}: entropy histogram sums to {int(hist.sum())}, the record "
                          f"declares {count} values")
    codes = _lane_decode(view[used:], hist, count, where)
    if not np.array_equal(np.bincount(codes, minlength=1 << bits)[: 1 << bits], hist):
        raise DecodeError(f"{where}: rANS stream does not decode to its histogram")
    return codes


def empirical_entropy_bytes(codes: np.ndarray, bits: int) -> float:
    """count x H(codes) / 8: what an ideal coder of this histogram needs (no model cost)."""
    hist = np.bincount(codes, minlength=1 << bits).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0.0
    p = hist[hist > 0] / total
    return float(-(hist[hist > 0] * np.log2(p)).sum() / 8.0) + 0.0  # never -0.0


__all__ = ["LANE_MIN", "LANE_STEPS", "available", "decode_codes", "empirical_entropy_bytes",
           "encode_codes"]
