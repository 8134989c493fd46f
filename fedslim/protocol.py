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

from dataclasses import dataclass

from flwr.app import ConfigRecord

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
UP = "fedslim.up"
PAYLOAD = "fedslim.payload"
PAYLOAD_ARRAY = "fedslim"          # the one Array inside DELTA / PAYLOAD records

# Client-side state (``context.state``), private to the mod.
STATE_GLOBAL = "fedslim.global"    # ArrayRecord: the global model this node holds
STATE_META = "fedslim.meta"        # ConfigRecord: stream + version of STATE_GLOBAL
STATE_EF = "fedslim.ef"            # ArrayRecord: error-feedback residuals
STATE_EF_META = "fedslim.ef-meta"  # ConfigRecord: stream the residuals belong to

# -- files in output-dir ------------------------------------------------------------------
RESULTS_FILE = "results.json"
MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
STUDENT_FILE = "student.safetensors"
STUDENT_INT8_FILE = "student_int8.safetensors"

MetricValue = int | float | list[int] | list[float]  # what a MetricRecord holds

_MAX_INT = (1 << 62) - 1


def _field(rec: ConfigRecord, key: str, who: str) -> object:
    if key not in rec:
        raise UpdateRejected(f"{who}: header lacks {key!r}")
    return rec[key]


def _bad(who: str, key: str, value: object, expected: str) -> UpdateRejected:
    return UpdateRejected(f"{who}: header field {key!r} is {str(value)[:60]!r}, expected "
                          f"{expected}")


def _int(rec: ConfigRecord, key: str, who: str, low: int = 0) -> int:
    value = _field(rec, key, who)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _MAX_INT:
        raise _bad(who, key, value, f"an integer in [{low}, {_MAX_INT}]")
    return value


def _float(rec: ConfigRecord, key: str, who: str) -> float:
    value = _field(rec, key, who)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0.0 <= float(value) < 1e9:
        raise _bad(who, key, value, "a finite number >= 0")
    return float(value)


def _bool(rec: ConfigRecord, key: str, who: str) -> bool:
    value = _field(rec, key, who)
    if not isinstance(value, bool):
        raise _bad(who, key, value, "a bool")
    return value


def _str(rec: ConfigRecord, key: str, who: str) -> str:
    value = _field(rec, key, who)
    if not isinstance(value, str) or len(value) > 256:
        raise _bad(who, key, value, "a string of at most 256 characters")
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
        -1 when the app's arrays record carries the full model; else the version the
        node must hold: the delta record (if any) takes it from ``base`` to ``version``,
        and ``base == version`` means "you hold it already".
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

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"stream": self.stream, "version": self.version,
                             "base": self.base, "arrays-key": self.arrays_key,
                             "uplink": self.uplink, "error-feedback": self.error_feedback,
                             "keep": self.keep, "round": self.server_round,
                             "seed": self.seed, "init-crc": self.init_crc})

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> DownlinkHeader:
        who = "downlink"
        return cls(stream=_int(rec, "stream", who), version=_int(rec, "version", who),
                   base=_int(rec, "base", who, low=-1), arrays_key=_str(rec, "arrays-key", who),
                   uplink=_str(rec, "uplink", who),
                   error_feedback=_bool(rec, "error-feedback", who),
                   keep=_bool(rec, "keep", who), server_round=_int(rec, "round", who),
                   seed=_int(rec, "seed", who), init_crc=_int(rec, "init-crc", who))


@dataclass(frozen=True)
class UplinkHeader:
    """What the mod adds to a train reply: which global it answers, and codec figures.

    ``stream``, ``version`` and ``server_round`` bind the reply to the message it answers
    (a reply to another round or version is rejected); ``global_crc`` proves the node's
    copy of the global model is bit-identical to the server's.
    """

    stream: int
    version: int
    server_round: int
    global_crc: int
    arrays_key: str
    encode_seconds: float
    raw_bytes: int

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"stream": self.stream, "version": self.version,
                             "round": self.server_round, "global-crc": self.global_crc,
                             "arrays-key": self.arrays_key,
                             "encode-seconds": self.encode_seconds,
                             "raw-bytes": self.raw_bytes})

    @classmethod
    def from_record(cls, rec: ConfigRecord, who: str) -> UplinkHeader:
        """Parse an untrusted header: every field type- and range-checked."""
        return cls(stream=_int(rec, "stream", who), version=_int(rec, "version", who),
                   server_round=_int(rec, "round", who),
                   global_crc=_int(rec, "global-crc", who),
                   arrays_key=_str(rec, "arrays-key", who),
                   encode_seconds=_float(rec, "encode-seconds", who),
                   raw_bytes=_int(rec, "raw-bytes", who))
