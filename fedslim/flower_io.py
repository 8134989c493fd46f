"""How fedslim's payloads ride in Flower records, and how many bytes a message really is.

Shared by the ClientApp and the server strategies, so both sides pack, unpack and apply
deltas with the *same* code (which is what keeps their copies of the global model
bit-identical).
"""

from __future__ import annotations

import io
import math
import warnings
import weakref
import zlib
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedslim.compression import WIRE_STYPE, buffers
from fedslim.errors import DecodeError, UpdateRejected
from fedslim.protocol import PAYLOAD, PAYLOAD_ARRAY


def payload_record(payload: bytes) -> ArrayRecord:
    """Wrap encoded bytes in an ArrayRecord: one uint8 Array whose stype names our format."""
    arr = Array(dtype="uint8", shape=(len(payload),), stype=WIRE_STYPE, data=payload)
    return ArrayRecord({PAYLOAD_ARRAY: arr})


def payload_from_record(record: ArrayRecord, where: str) -> bytes:
    """The payload bytes of a record made by :func:`payload_record`, checked."""
    if list(record.keys()) != [PAYLOAD_ARRAY]:
        raise DecodeError(f"{where}: expected one array {PAYLOAD_ARRAY!r}, got "
                          f"{list(record.keys())[:5]}")
    arr = record[PAYLOAD_ARRAY]
    if arr.stype != WIRE_STYPE:
        raise DecodeError(f"{where}: array stype is {arr.stype!r}, expected {WIRE_STYPE!r}")
    return bytes(arr.data)


COMPACT_MAX = 1 << 16
"""Payloads (uplink header included) up to this size travel in the compact form."""
COMPACT_DATA = "fedslim.h"    # compact form: header + payload (bytes)
COMPACT_NAME = "fedslim.m"    # compact form: the MetricRecord's name, if not "metrics"
_RESERVED = "fedslim."
_METRICS = "metrics"


def fold_reply(content: RecordDict, data: bytes) -> bool:
    """Put a train reply's payload ``data`` and its one MetricRecord into ONE ConfigRecord
    (``content[PAYLOAD]``), in place; False (content untouched) if it does not qualify.

    Flower serializes each record, array and chunk as its own object, named by a 64-hex-
    digit id in its parent: an ArrayRecord + Array + chunk + MetricRecord cost ~0.78 kB of
    envelope around a small payload, one ConfigRecord ~0.3 kB. Qualifies when ``data`` is
    at most :data:`COMPACT_MAX` bytes, the reply has exactly one MetricRecord and no metric
    name starts with ``fedslim.``. :func:`unfold_reply` restores the usual records.
    """
    metrics = list(content.metric_records.items())
    if len(data) > COMPACT_MAX or len(metrics) != 1 or PAYLOAD in content:
        return False
    name, record = metrics[0]
    if any(key.startswith(_RESERVED) for key in record):
        return False
    entries: dict[str, object] = {COMPACT_DATA: data}
    if name != _METRICS:
        entries[COMPACT_NAME] = name
    entries.update(record)
    del content[name]
    content[PAYLOAD] = ConfigRecord(entries)  # type: ignore[arg-type]
    return True


def unfold_reply(content: RecordDict, who: str) -> None:
    """Undo :func:`fold_reply` in place (an untrusted reply: every entry is checked):
    ``content[PAYLOAD]`` becomes the payload ArrayRecord again, the rest a MetricRecord.
    A reply that is not in the compact form is left as it is."""
    record = content.config_records.get(PAYLOAD)
    if record is None:
        return
    if content.metric_records:
        raise UpdateRejected(f"{who}: compact reply also carries a MetricRecord")
    data = record.get(COMPACT_DATA)
    if not isinstance(data, bytes) or not 0 < len(data) <= COMPACT_MAX:
        raise UpdateRejected(f"{who}: compact reply's {COMPACT_DATA!r} is not 1..{COMPACT_MAX}"
                             " bytes")
    name = record.get(COMPACT_NAME, _METRICS)
    if not isinstance(name, str) or not 0 < len(name) <= 128 or name.startswith(_RESERVED) \
            or name in content:
        raise UpdateRejected(f"{who}: compact reply names its metrics {str(name)[:60]!r}")
    if len(record) > 1024 + 2:
        raise UpdateRejected(f"{who}: {len(record)} entries in the compact reply, at most "
                             "1024 metrics are accepted")
    metrics = {k: v for k, v in record.items() if k not in (COMPACT_DATA, COMPACT_NAME)}
    for key, value in metrics.items():
        if key.startswith(_RESERVED):
            raise UpdateRejected(f"{who}: unknown entry {key[:60]!r} in the compact reply")
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise UpdateRejected(f"{who}: metric {key[:60]!r} is {str(value)[:60]!r}, "
                                 "expected numbers")
    try:
        rebuilt = MetricRecord(metrics)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise UpdateRejected(f"{who}: compact reply's metrics: {exc}") from None
    del content[PAYLOAD]
    content[PAYLOAD] = payload_record(data)
    content[name] = rebuilt


def chain_record(payloads: list[bytes]) -> ArrayRecord:
    """Several payloads, applied in order (``fedslim.0``, ``fedslim.1``, ...)."""
    return ArrayRecord({f"{PAYLOAD_ARRAY}.{i}": Array(dtype="uint8", shape=(len(p),),
                                                      stype=WIRE_STYPE, data=p)
                        for i, p in enumerate(payloads)})


def chain_from_record(record: ArrayRecord, count: int, where: str) -> list[bytes]:
    """The payloads of a :func:`chain_record`; exactly ``count`` of them, checked."""
    names = [f"{PAYLOAD_ARRAY}.{i}" for i in range(count)]
    if list(record.keys()) != names:
        raise DecodeError(f"{where}: expected arrays {names[:3]}... ({count}), got "
                          f"{list(record.keys())[:5]}")
    out = []
    for name in names:
        arr = record[name]
        if arr.stype != WIRE_STYPE:
            raise DecodeError(f"{where}: array {name!r} stype is {arr.stype!r}, expected "
                              f"{WIRE_STYPE!r}")
        out.append(bytes(arr.data))
    return out


def state_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state dict as plain numpy-serialized arrays (exactly what stock Flower sends)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy()))
                        for k, v in state.items()})


_Signature = tuple[tuple[str, int], ...]
_CONVERTED: dict[int, tuple[weakref.ref[ArrayRecord], _Signature, dict[str, torch.Tensor]]] = {}
_CACHE_LIMIT = 512


def array_tensor(array: Array) -> torch.Tensor:
    """The tensor an ``Array`` holds, read in place from its serialized bytes when they
    are a plain ``.npy`` (C order, native byte order, no objects) -- no copy, so a 40 MB
    reply costs nothing to read -- else through ``Array.numpy()``. Read-only: the tensor
    shares the Array's immutable bytes; never write into it.

    Raises
    ------
    DecodeError
        If the array is not a numpy array or cannot be read.
    """
    data = array.data
    if array.stype == SType.NUMPY and isinstance(data, bytes):
        try:
            head = io.BytesIO(data)
            version = np.lib.format.read_magic(head)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(head)
                                     if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(head))
            if not fortran and not dtype.hasobject and dtype.isnative \
                    and all(d >= 0 for d in shape):
                flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape),
                                     offset=head.tell())
                with warnings.catch_warnings():  # (read-only by contract, see above)
                    warnings.simplefilter("ignore", UserWarning)
                    return torch.from_numpy(flat.reshape(shape))
        except (ValueError, TypeError):
            pass  # numpy's own reader says what is wrong
    try:
        value = array.numpy()
        if not value.dtype.isnative:  # (torch reads native byte order only)
            value = value.astype(value.dtype.newbyteorder("="))
        return torch.from_numpy(value)
    except Exception as exc:  # flwr/numpy raise various errors on malformed arrays
        raise DecodeError(f"array cannot be read as a numpy array: {exc}") from None


def to_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ArrayRecord of numpy arrays as a CPU state dict (floating entries as float32).

    The server's layers (uplink checks, defences, the inner strategy) each read the same
    reply; the conversion is remembered per record object (while it lives and holds the
    same Array objects), so a reply is deserialized once. The tensors are shared between
    callers: treat them as read-only (every fedslim caller does).

    Raises
    ------
    DecodeError
        If an array is not a plain numpy array (another ``stype``) or cannot be read.
    """
    key, signature = id(arrays), tuple((k, id(v)) for k, v in arrays.items())
    hit = _CONVERTED.get(key)
    if hit is not None and hit[0]() is arrays and hit[1] == signature:
        return dict(hit[2])
    try:
        state = arrays.to_torch_state_dict()
    except Exception as exc:  # flwr/numpy raise various errors on malformed arrays
        raise DecodeError(f"arrays cannot be read as numpy arrays: {exc}") from None
    out = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if len(_CONVERTED) >= _CACHE_LIMIT:  # many records alive at once: forget the oldest
        for k in list(_CONVERTED)[:_CACHE_LIMIT // 8]:
            del _CONVERTED[k]

    def forget(_: object, k: int = key) -> None:  # the entry goes when the record does,
        _CONVERTED.pop(k, None)                   # before its id can be reused

    _CONVERTED[key] = (weakref.ref(arrays, forget), signature, out)
    return dict(out)


def apply_delta(prev: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor],
                into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``prev + delta`` on CPU in float32 (entries without a delta are kept).

    Client and server both call this on the same inputs, so the result is bit-identical.
    ``into``: buffers by name to add into where shape and dtype fit (they may be ``prev``'s
    own tensors: an in-place step), else a new tensor.
    """
    out = {}
    for k, v in prev.items():
        v = v.cpu()
        if k not in delta:
            out[k] = v.clone()
            continue
        target = None if into is None else into.get(k)
        if target is not None and buffers.fits(target, v.numel(), v.dtype, v.device):
            target = target.view(v.shape)
        else:
            target = buffers.like(v)  # (huge pages: a third of the time of a fresh result)
        out[k] = torch.add(v, delta[k].cpu().to(v.dtype), out=target)
    return out


def state_crc(state: Mapping[str, torch.Tensor]) -> int:
    """CRC32 over every tensor's bytes in name order: cheap proof of bit-identical weights."""
    crc = 0
    for name in sorted(state):
        crc = zlib.crc32(name.encode(), crc)
        data = np.ascontiguousarray(state[name].detach().cpu().numpy())  # a view if it can
        crc = zlib.crc32(data.reshape(-1).view(np.uint8).data, crc)  # no copy of the bytes
    return crc


def content_bytes(content: RecordDict | ArrayRecord | ConfigRecord | MetricRecord) -> int:
    """Serialized size of a RecordDict (or one record) as Flower ships it: every unique
    object it holds."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def message_bytes(msg: Message) -> int:
    """Serialized size of a whole message (header + content objects), Flower's own format."""
    if msg.has_error():
        return len(msg.deflate())
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())
