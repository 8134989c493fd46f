"""Uplink decoding: one untrusted train reply in, validated plain weights out (or a reject).

Everything a client sends is checked against what the server expects before it is used:

* the reply's header (:class:`~fedslim.protocol.UplinkHeader`) must answer *this* message:
  same stream, version and round, and a CRC equal to the server's copy of the global;
* a payload is decoded against the model's size (``max_elements`` = the model's float
  element count, so a hostile header cannot make the server allocate more) and must use
  the pipeline the server asked for this round;
* names, shapes and values (finite) must match the global model;
* ``num-examples`` must be a positive finite number.

The result is the reply as the wrapped strategy wants it: ``arrays`` = base + update as
plain float32 arrays (integer buffers are the server's own), the client's metrics as sent.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from flwr.app import Message, MetricRecord, RecordDict

from fedslim.compression import PipelineSpec, decode_update
from fedslim.compression.buffers import all_finite
from fedslim.errors import UpdateRejected
from fedslim.flower_io import payload_from_record, state_record, to_state
from fedslim.protocol import NUM_EXAMPLES, PARTITION_ID, PAYLOAD, UP, UplinkHeader
from fedslim.strategies.aggregate import State, float_keys, validate_update


@dataclass(frozen=True)
class Expected:
    """What a train reply must answer."""

    stream: int
    version: int
    server_round: int
    crc: int
    arrays_key: str
    spec: PipelineSpec          # the pipeline asked for this round
    framed: bool                # the server sent a header: the reply must carry one


@dataclass
class Decoded:
    content: RecordDict         # plain reply content for the wrapped strategy
    weight: float
    encode_seconds: float
    decode_seconds: float
    node_decode_seconds: float
    kept: dict[str, int] = field(default_factory=dict)  # values sent per tensor (payloads)
    weights: State = field(default_factory=dict)  # the reply's weights (base + update)


MAX_EXAMPLES = 1e12  # no client holds more; beyond 2^53 a count is not even an integer


def check_weight(metrics: MetricRecord | None, who: str, allow_zero: bool = False) -> float:
    """The reply's ``num-examples`` as a positive (or, if allowed, zero) finite float."""
    if metrics is None or NUM_EXAMPLES not in metrics:
        raise UpdateRejected(f"{who}: reply has no MetricRecord with {NUM_EXAMPLES!r}")
    value = metrics[NUM_EXAMPLES]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UpdateRejected(f"{who}: {NUM_EXAMPLES} is {str(value)[:40]!r}, expected a number")
    if not math.isfinite(float(value)) or value < 0 or (value == 0 and not allow_zero) \
            or value > MAX_EXAMPLES:
        raise UpdateRejected(f"{who}: {NUM_EXAMPLES} is {value}, expected a positive count "
                             f"of at most {MAX_EXAMPLES:.0e}")
    return float(value)


def check_metrics(metrics: MetricRecord, who: str) -> None:
    """Every metric a client sends is a finite number (or a list of them), at most 1024
    of them; ``partition-id``, when present, is an integer in [0, 2^31)."""
    if len(metrics) > 1024:
        raise UpdateRejected(f"{who}: {len(metrics)} metrics, at most 1024 are accepted")
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if len(values) > 1 << 16 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) for v in values):
            raise UpdateRejected(f"{who}: metric {key[:60]!r} is {str(value)[:60]!r}, "
                                 "expected finite numbers")
    if PARTITION_ID in metrics:
        pid = metrics[PARTITION_ID]
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < 1 << 31:
            raise UpdateRejected(f"{who}: {PARTITION_ID} is {str(pid)[:60]!r}, expected an "
                                 "integer >= 0")


def partition_of(msg: Message) -> int | None:
    """The ``partition-id`` a reply reports, if it is a sane integer (else None)."""
    if msg.has_error():
        return None
    for rec in msg.content.metric_records.values():
        value = rec.get(PARTITION_ID)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 31:
            return value
    return None


def reply_order(msg: Message) -> tuple[int, int]:
    """Sort key that makes aggregation order independent of arrival order."""
    part = partition_of(msg)
    return (part if part is not None else 1 << 31, msg.metadata.src_node_id)


def _metrics(content: RecordDict, who: str) -> MetricRecord:
    recs = list(content.metric_records.values())
    if len(recs) != 1:
        raise UpdateRejected(f"{who}: reply must carry exactly one MetricRecord, has "
                             f"{len(recs)}")
    return recs[0]


class UplinkDecoder:
    """Decodes and validates train replies against the current global model."""

    def decode(self, msg: Message, base: State, exp: Expected,
               materialize: bool = True) -> Decoded:
        """Validate ``msg`` and decode its weights. ``materialize=False`` leaves them out of
        ``content`` (only in ``weights``): nothing is copied into an ArrayRecord."""
        who = f"node {msg.metadata.src_node_id}"
        content = msg.content
        metrics = _metrics(content, who)
        check_metrics(metrics, who)
        weight = check_weight(metrics, who)
        t0 = time.perf_counter()
        header, payload = self._header(content, exp, who)
        out = RecordDict({k: v for k, v in content.items() if k not in (UP, PAYLOAD)})
        kept: dict[str, int] = {}
        if exp.spec.is_identity:  # plain arrays: validated, passed on as the client sent them
            weights = self._plain(content, base, exp.arrays_key, who)
        else:
            weights, kept = self._payload(payload, base, exp.spec, who)
            if materialize:
                out[exp.arrays_key] = state_record(weights)
        return Decoded(content=out, weight=weight,
                       encode_seconds=header.encode_seconds if header else 0.0,
                       decode_seconds=time.perf_counter() - t0,
                       node_decode_seconds=header.decode_seconds if header else 0.0,
                       kept=kept, weights=weights)

    def _header(self, content: RecordDict, exp: Expected, who: str
                ) -> tuple[UplinkHeader | None, bytes]:
        """The uplink header (in the payload array, or a record for plain replies), checked
        against what the reply must answer; and the wire payload after it."""
        header, payload = None, b""
        if PAYLOAD in content.array_records:
            data = payload_from_record(content.array_records[PAYLOAD], who)
            header, used = UplinkHeader.unpack(data, who)
            payload = data[used:]
        elif UP in content.config_records:
            header = UplinkHeader.from_record(content.config_records[UP], who)
        elif exp.framed:
            raise UpdateRejected(f"{who}: reply lacks the {UP!r} header; add "
                                 "fedslim.client.compression_mod to the ClientApp's mods")
        if header is not None:
            self.check_binding(header, exp, who)
        elif not exp.spec.is_identity:
            raise UpdateRejected(f"{who}: reply has no {PAYLOAD!r} record (uplink={exp.spec})")
        return header, payload

    @staticmethod
    def check_binding(h: UplinkHeader, exp: Expected, who: str) -> None:
        """The header answers this message, and the node's copy equals the server's."""
        if (h.stream, h.version, h.server_round) != (exp.stream, exp.version,
                                                     exp.server_round):
            raise UpdateRejected(
                f"{who}: reply answers stream {h.stream} version {h.version} round "
                f"{h.server_round}, not this round's ({exp.stream}, {exp.version}, "
                f"{exp.server_round}): stale or replayed")
        if h.global_crc != exp.crc:
            raise UpdateRejected(f"{who}: its copy of the global model differs from the "
                                 f"server's (crc {h.global_crc} != {exp.crc})")
        if h.arrays_key != exp.arrays_key:
            raise UpdateRejected(f"{who}: header names arrays record {h.arrays_key!r}, "
                                 f"expected {exp.arrays_key!r}")

    @staticmethod
    def _plain(content: RecordDict, base: State, key: str, who: str) -> State:
        records = content.array_records
        if key not in records:
            raise UpdateRejected(f"{who}: reply has no ArrayRecord {key!r} (has "
                                 f"{sorted(records)[:5]})")
        try:
            local = to_state(records[key])
        except Exception as exc:
            raise UpdateRejected(f"{who}: {exc}") from None
        expected = {k: tuple(v.shape) for k, v in base.items()}
        missing, extra = sorted(set(expected) - set(local)), sorted(set(local) - set(expected))
        if missing or extra:
            raise UpdateRejected(f"{who}: parameter names differ from the server's model "
                                 f"(missing {missing[:5]}, unexpected {extra[:5]}); client "
                                 "and server must build the same model")
        fkeys = float_keys(base)
        validate_update({k: local[k] for k in fkeys},
                        {k: expected[k] for k in fkeys}, who)
        for k in base:
            if k not in fkeys and tuple(local[k].shape) != expected[k]:
                raise UpdateRejected(f"{who}: tensor {k!r} has shape {tuple(local[k].shape)}, "
                                     f"expected {expected[k]}")
        return local

    @staticmethod
    def _payload(payload: bytes, base: State, spec: PipelineSpec, who: str
                 ) -> tuple[State, dict[str, int]]:
        fkeys = float_keys(base)
        limit = sum(base[k].numel() for k in fkeys)
        schema = {k: tuple(base[k].shape) for k in fkeys}
        decoded = decode_update(payload, max_elements=max(limit, 1), expected_spec=spec,
                                schema=schema)
        if decoded.spec != spec:
            raise UpdateRejected(f"{who}: payload uses pipeline {str(decoded.spec)!r}, the "
                                 f"server asked for {str(spec)!r}")
        update = decoded.tensors
        validate_update(update, {k: tuple(base[k].shape) for k in fkeys}, who)
        weights = {k: base[k] + update[k] if k in update else base[k] for k in base}
        for k in update:
            if not all_finite(weights[k]):
                raise UpdateRejected(f"{who}: global + update overflows to Inf in {k!r}")
        return weights, decoded.kept


__all__ = ["Decoded", "Expected", "UplinkDecoder", "check_weight", "partition_of",
           "reply_order"]
