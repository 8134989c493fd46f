"""The protocol between fedslim's server side and client side, named once.

Two layers travel in a Flower message:

* the **app layer**, exactly as Flower's own strategies and quickstart apps use it: an
  ``ArrayRecord`` of weights under ``"arrays"``, a ``ConfigRecord`` under ``"config"``
  (with ``"server-round"``) and a ``MetricRecord`` under ``"metrics"`` (with
  ``"num-examples"``);
* the **compression layer**, added by the :class:`~fedslim.strategies.compressed.Compressed`
  strategy wrapper on the way out and removed by
  :func:`~fedslim.client.mod.compression_mod` on the way in (and the reverse for replies).
  The app never sees it. Its records::

      server -> node   ConfigRecord  "fedslim.down"   a DownlinkHeader
                       ArrayRecord   "fedslim.delta"  downlink payload (new - held global),
                                                      only when the node holds the base
                       (the app's "arrays" record is left out unless the node needs the
                       full model)
      node -> server   ConfigRecord  "fedslim.up"     an UplinkHeader
                       ArrayRecord   "fedslim.payload" uplink payload (local - global + EF)
                       (replaces the app's "arrays" record)

A payload rides as ONE uint8 ``Array`` whose ``stype`` names fedslim's wire format
(:data:`fedslim.compression.WIRE_STYPE`); nothing is pickled. Headers are typed
dataclasses: :meth:`UplinkHeader.from_record` is the server's validation of what a client
claims, so every field is type- and range-checked there.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from flwr.app import ConfigRecord, Message, RecordDict

from fedslim.errors import UpdateRejected

# -- app layer (Flower's FedAvg defaults; a stock quickstart ClientApp uses these) --------
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SERVER_ROUND = "server-round"      # ConfigRecord key Flower's strategies inject
NUM_EXAMPLES = "num-examples"      # MetricRecord key FedAvg weights by
PARTITION_ID = "partition-id"      # node_config key (and a metric fedslim's client reports)
NUM_PARTITIONS = "num-partitions"  # node_config key

# -- compression layer ------------------------------------------------------------------
DOWN = "fedslim.down"
DELTA = "fedslim.delta"
KEY_BASE = -2  # DownlinkHeader.base of a keyframe chain (see fedslim.strategies.downlink)
# In a node's error when it cannot build the round-0 model the server asked it to build:
# the server then stops asking that node (full model instead), and only then.
INIT_FAILED = "cannot build the round-0 model"
UP = "fedslim.up"
PAYLOAD = "fedslim.payload"
PAYLOAD_ARRAY = "fedslim"          # the one Array inside DELTA / PAYLOAD records

# Client-side state (``context.state``), private to the mod.
STATE_GLOBAL = "fedslim.global"    # ArrayRecord: the global model this node holds
STATE_META = "fedslim.meta"        # ConfigRecord: stream + version of STATE_GLOBAL
STATE_EF = "fedslim.ef"            # ArrayRecord: error-feedback residuals
STATE_EF_META = "fedslim.ef-meta"  # ConfigRecord: stream the residuals belong to
STATE_LOWRANK = "fedslim.lowrank"  # ArrayRecord: lowrank's warm-start Q per tensor

# -- files in output-dir ------------------------------------------------------------------
RESULTS_FILE = "results.json"
MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
STUDENT_FILE = "student.safetensors"
STUDENT_INT8_FILE = "student_int8.safetensors"

MetricValue = int | float | list[int] | list[float]  # what a MetricRecord holds
HEADER_KEY = "h"  # the one (bytes) value of a DOWN / UP ConfigRecord
_DOWN = struct.Struct("<4sBIIiIQIBQ")  # magic ver stream version base round seed init flags lineage
_UP = struct.Struct("<4sBIIIIII")  # magic ver stream version round crc encode-us decode-us


def _take_str(data: bytes, offset: int, width: int, who: str, what: str) -> tuple[str, int]:
    """A length-prefixed (``width`` bytes) ASCII string at ``offset``; its end offset."""
    if len(data) < offset + width:
        raise UpdateRejected(f"{who}: header truncated before {what}")
    n = int.from_bytes(data[offset:offset + width], "little")
    end = offset + width + n
    if n > 512 or len(data) < end:
        raise UpdateRejected(f"{who}: header {what} of {n} bytes does not fit")
    try:
        return data[offset + width:end].decode("ascii"), end
    except UnicodeDecodeError:
        raise UpdateRejected(f"{who}: header {what} is not ASCII") from None


def _micros(seconds: float) -> int:
    """A duration as whole microseconds in a u32 (clamped: ~71 minutes at most)."""
    return min(max(int(seconds * 1e6), 0), (1 << 32) - 1)


def _put_str(text: str, width: int) -> bytes:
    raw = text.encode("ascii")
    return len(raw).to_bytes(width, "little") + raw


def header_bytes(rec: ConfigRecord, who: str) -> bytes:
    """The bytes of a header record: one ``bytes`` value under ``HEADER_KEY``."""
    value = rec.get(HEADER_KEY)
    if len(rec) != 1 or not isinstance(value, bytes):
        raise UpdateRejected(f"{who}: header record must hold one bytes value "
                             f"{HEADER_KEY!r}, has {sorted(rec)[:5]}")
    return value


@dataclass(frozen=True)
class DownlinkHeader:
    """What the server tells a node besides the app's own records.

    Attributes
    ----------
    stream : int
        Identifies the server-side wrapper instance; versions are only comparable within
        one stream (a node holding a version of another stream gets the full model).
    version : int
        The global model version this message brings the node to.
    base : int
        -1 when the app's arrays record carries the full model; :data:`KEY_BASE` (-2) for
        a keyframe chain: the node builds the round-0 model (``init_crc``), the delta
        record's first payload takes it to the last keyframe and the others (one per
        version) on to ``version``; else the version the node must hold: the delta record
        (if any) takes it from ``base`` to ``version``, and ``base == version`` means "you
        hold it already".
    arrays_key : str
        The record name the app expects its weights under.
    uplink : str
        Canonical pipeline spec to encode the reply with (``none``: plain arrays).
    error_feedback : bool
        Whether the node keeps an error-feedback residual.
    keep : bool
        Whether the node must remember this version (downlink deltas are on).
    server_round : int
        Absolute round (seeds the client's stochastic rounding).
    seed : int
        Run seed (same purpose).
    init_crc : int
        Nonzero: the node does not hold ``base``; it builds it itself (the run's seeded
        round-0 model, whose CRC this is) and then applies the delta chain.
    lineage : int
        Identifies the run across resumptions (0: none); a node may persist its
        error-feedback residual under it and pick it up after the server resumes.
    ef_reset_after : int
        0..63; nonzero: a node that last trained more than this many rounds ago drops its
        error-feedback residual (a stale residual points where the model no longer is).
    """

    stream: int
    version: int
    base: int
    arrays_key: str
    uplink: str
    error_feedback: bool
    keep: bool
    server_round: int
    seed: int
    init_crc: int = 0
    lineage: int = 0
    ef_reset_after: int = 0

    MAGIC: ClassVar[bytes] = b"FSDN"

    def pack(self) -> bytes:
        if not 0 <= self.ef_reset_after <= 63:
            raise ValueError(f"ef_reset_after must be in [0, 63], got {self.ef_reset_after}")
        flags = int(self.error_feedback) | int(self.keep) << 1 | self.ef_reset_after << 2
        return (_DOWN.pack(self.MAGIC, 1, self.stream, self.version, self.base,
                           self.server_round, self.seed, self.init_crc, flags, self.lineage)
                + _put_str(self.arrays_key, 1) + _put_str(self.uplink, 2))

    @classmethod
    def unpack(cls, data: bytes, who: str = "downlink") -> DownlinkHeader:
        if len(data) < _DOWN.size:
            raise UpdateRejected(f"{who}: header of {len(data)} bytes, need {_DOWN.size}+")
        (magic, ver, stream, version, base, rnd, seed, init_crc, flags,
         lineage) = _DOWN.unpack_from(data)
        if (magic != cls.MAGIC or ver != 1 or base < KEY_BASE
                or (base == KEY_BASE and not init_crc)):
            raise UpdateRejected(f"{who}: not a fedslim v1 downlink header")
        key, end = _take_str(data, _DOWN.size, 1, who, "arrays key")
        uplink, end = _take_str(data, end, 2, who, "uplink spec")
        if end != len(data):
            raise UpdateRejected(f"{who}: {len(data) - end} trailing header bytes")
        return cls(stream=stream, version=version, base=base, arrays_key=key, uplink=uplink,
                   error_feedback=bool(flags & 1), keep=bool(flags & 2), server_round=rnd,
                   seed=seed, init_crc=init_crc, lineage=lineage, ef_reset_after=flags >> 2)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({HEADER_KEY: self.pack()})

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> DownlinkHeader:
        return cls.unpack(header_bytes(rec, "downlink"))


@dataclass(frozen=True)
class UplinkHeader:
    """What the mod adds to a train reply: which global it answers, and codec figures.

    ``stream``, ``version`` and ``server_round`` bind the reply to the message it answers
    (a reply to another round or version is rejected); ``global_crc`` proves the node's
    copy of the global model is bit-identical to the server's. ``encode_seconds`` is the
    node's uplink encode time, ``decode_seconds`` the time it took to bring the downlink to
    the global model (load its held copy, decode and apply the delta, keep the result; not
    building the round-0 model from the seed, which is the app's own model construction):
    reported, untrusted, used only for the codec-share figures.
    """

    stream: int
    version: int
    server_round: int
    global_crc: int
    arrays_key: str
    encode_seconds: float
    decode_seconds: float = 0.0

    MAGIC: ClassVar[bytes] = b"FSUP"
    VERSION: ClassVar[int] = 2

    def pack(self) -> bytes:
        return _UP.pack(self.MAGIC, self.VERSION, self.stream, self.version, self.server_round,
                        self.global_crc, _micros(self.encode_seconds),
                        _micros(self.decode_seconds)) + _put_str(self.arrays_key, 1)

    @classmethod
    def unpack(cls, data: bytes, who: str) -> tuple[UplinkHeader, int]:
        """Parse an untrusted header at the start of ``data``; (header, bytes used)."""
        if len(data) < _UP.size:
            raise UpdateRejected(f"{who}: uplink header of {len(data)} bytes, need "
                                 f"{_UP.size}+")
        magic, ver, stream, version, rnd, crc, enc, dec = _UP.unpack_from(data)
        if magic != cls.MAGIC or ver != cls.VERSION:
            raise UpdateRejected(f"{who}: not a fedslim v{cls.VERSION} uplink header")
        key, end = _take_str(data, _UP.size, 1, who, "arrays key")
        return cls(stream=stream, version=version, server_round=rnd, global_crc=crc,
                   arrays_key=key, encode_seconds=enc / 1e6, decode_seconds=dec / 1e6), end

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({HEADER_KEY: self.pack()})

    @classmethod
    def from_record(cls, rec: ConfigRecord, who: str) -> UplinkHeader:
        """Parse an untrusted header record (plain replies, evaluate acknowledgments)."""
        data = header_bytes(rec, who)
        header, end = cls.unpack(data, who)
        if end != len(data):
            raise UpdateRejected(f"{who}: {len(data) - end} trailing header bytes")
        return header


HELLO = "fedslim_hello"
"""Query action (``query.fedslim_hello``): a node answers with its ``partition-id``, so
the server can sample nodes in an order that does not depend on random node ids."""


def answer_hello(msg: Message, partition_id: object) -> Message:
    """A ClientApp's answer to ``query.fedslim_hello``: its partition id (or none)."""
    rec = ConfigRecord({"partition-id": partition_id} if isinstance(partition_id, int)
                       and not isinstance(partition_id, bool) else {})
    return Message(RecordDict({HELLO: rec}), reply_to=msg)
