"""Compressed FedAvg: decode, validate and average client *updates*; account every byte.

Built on Flower's ``Strategy.start`` loop through the same hooks as FedAvg:

* ``configure_*`` sends each node either the full float32 model (stock Flower) or, with a
  ``downlink`` pipeline, the compressed delta from the version that node last received
  (full-model fallback for nodes that missed rounds or lost their state);
* ``aggregate_train`` decodes each reply (our wire format, or plain float32 weights for
  ``uplink=none``), rejects malformed ones with a logged reason, averages the rest with
  :func:`~fedslim.strategies.aggregate.weighted_mean` and applies the server optimizer;
* every sent and received message is measured with Flower's own serialization.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedslim.compression import decode_update, encode_update, parse_spec
from fedslim.config import CompressionConfig
from fedslim.errors import FedslimError, UpdateRejected
from fedslim.flower_io import (
    ARRAYS_KEY,
    CONFIG_KEY,
    DELTA_KEY,
    METRICS_KEY,
    PAYLOAD_KEY,
    apply_delta,
    content_bytes,
    message_bytes,
    payload_from_record,
    payload_record,
    state_crc,
    state_record,
)
from fedslim.strategies.aggregate import (
    ServerOptimizer,
    State,
    apply_step,
    float_keys,
    metric_scalar,
    validate_update,
    validate_weight,
    weighted_mean,
)
from fedslim.strategies.common import aggregate_metrics, seeded_sample
from fedslim.strategies.fedavg import FedslimFedAvg, partition_of

log = logging.getLogger("flwr").getChild("fedslim")


@dataclass
class RoundComm:
    """Bytes and times of one round, both directions, as serialized by Flower."""

    uplink_bytes: int = 0            # train replies
    uplink_eval_bytes: int = 0       # evaluate replies (metrics only)
    downlink_bytes: int = 0          # train instructions (model or delta)
    downlink_eval_bytes: int = 0     # evaluate instructions (model or delta)
    uplink_none_bytes: int = 0       # what the same train replies would be with uplink=none
    full_model_messages: int = 0
    delta_messages: int = 0
    encode_seconds: float = 0.0      # clients' encode time, summed
    decode_seconds: float = 0.0      # server's decode time
    per_client: dict[str, dict[str, int]] = field(default_factory=dict)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["uplink_ratio"] = (self.uplink_none_bytes / self.uplink_bytes
                               if self.uplink_bytes else None)
        return out


@dataclass
class DecodedReply:
    update: State
    weight: float
    metrics: RecordDict


class CompressedFedAvg(FedslimFedAvg):
    """FedAvg over (optionally compressed) updates with server optimizers and accounting."""

    def __init__(self, *, comp: CompressionConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.comp = comp
        self.downlink_spec = parse_spec(comp.downlink)
        self.use_delta = str(self.downlink_spec) != "none"
        self.opt = ServerOptimizer(comp.server_opt, comp.server_lr, comp.server_momentum)
        self.global_state: State | None = None
        self.version = 0
        self.delta_payload: bytes | None = None  # takes version-1 to version
        self.down_residual: State = {}
        self.node_version: dict[int, int] = {}   # version each node is known to hold
        self.sent_version: dict[int, int] = {}
        self.node_partition: dict[int, int] = {}
        self.crc_by_version: dict[int, int] = {}
        # The round's accepted replies and the global they built on (for distillation).
        self.last_accepted: list[DecodedReply] = []
        self.last_base: State | None = None
        self.comm = RoundComm()
        self.last_comm: dict[str, Any] | None = None
        self._none_reply_bytes: int | None = None

    # ------------------------------------------------------------------ downlink
    def _ensure_global(self, arrays: ArrayRecord) -> None:
        if self.global_state is None:
            self.global_state = {k: v.to(torch.float32) if v.is_floating_point() else v
                                 for k, v in arrays.to_torch_state_dict().items()}

    def _model_messages(self, node_ids: list[int], rnd: int, mtype: str,
                        config: ConfigRecord) -> list[Message]:
        assert self.global_state is not None
        base = dict(config)
        base.update({"server-round": rnd, "global-version": self.version})
        if self.version not in self.crc_by_version:
            self.crc_by_version = {self.version: state_crc(self.global_state)}
        full = RecordDict({ARRAYS_KEY: state_record(self.global_state),
                           CONFIG_KEY: ConfigRecord(base)})
        delta = current = None
        if self.use_delta:
            # A node that already holds this version gets no arrays at all.
            current = RecordDict({CONFIG_KEY: ConfigRecord({**base,
                                                            "base-version": self.version})})
            if self.delta_payload is not None:
                delta = RecordDict({DELTA_KEY: payload_record(self.delta_payload),
                                    CONFIG_KEY: ConfigRecord({**base,
                                                              "base-version": self.version - 1})})
        msgs = []
        for node in node_ids:
            held = self.node_version.get(node)
            if current is not None and held == self.version:
                content, use_delta = current, True
            elif delta is not None and held == self.version - 1:
                content, use_delta = delta, True
            else:
                content, use_delta = full, False
            msg = Message(content=content, message_type=mtype, dst_node_id=node)
            size = message_bytes(msg)
            if mtype == MessageType.TRAIN:
                self.comm.downlink_bytes += size
            else:
                self.comm.downlink_eval_bytes += size
            self.comm.delta_messages += int(use_delta)
            self.comm.full_model_messages += int(not use_delta)
            self.sent_version[node] = self.version
            msgs.append(msg)
        return msgs

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._ensure_global(arrays)
        self.comm = RoundComm()
        rnd = server_round + self.round_offset
        nodes = seeded_sample(grid, self.min_available_nodes, self.fraction_train,
                              self.min_train_nodes, self.seed, rnd, salt=0)
        return self._model_messages(nodes, rnd, MessageType.TRAIN, config)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        self._ensure_global(arrays)
        rnd = server_round + self.round_offset
        nodes = seeded_sample(grid, self.min_available_nodes, self.fraction_evaluate,
                              self.min_evaluate_nodes, self.seed, rnd, salt=1)
        return self._model_messages(nodes, rnd, MessageType.EVALUATE, config)

    # ------------------------------------------------------------------ uplink
    def _reject(self, msg: Message, reason: str) -> None:
        node = msg.metadata.src_node_id
        self.node_version.pop(node, None)  # its state is unknown: send it the full model
        part = self.node_partition.get(node, partition_of(msg))
        log.warning("rejected reply from node %s (partition %s): %s", node, part, reason)
        self.comm.rejected.append({"node": node, "partition": part, "reason": reason})

    def _none_bytes(self, metrics: MetricRecord) -> int:
        """Serialized size of the stock (uplink=none) reply: full float32 weights + metrics."""
        if self._none_reply_bytes is None:
            assert self.global_state is not None
            self._none_reply_bytes = content_bytes(RecordDict(
                {ARRAYS_KEY: state_record(self.global_state), METRICS_KEY: metrics}))
        return self._none_reply_bytes

    def decode_reply(self, msg: Message) -> DecodedReply:
        """Turn one train reply into a validated float32 update (delta) and its weight."""
        assert self.global_state is not None
        who = f"node {msg.metadata.src_node_id}"
        content = msg.content
        metrics = content.metric_records.get(METRICS_KEY)
        if metrics is None or "num-examples" not in metrics:
            raise UpdateRejected(f"{who}: reply has no MetricRecord {METRICS_KEY!r} with "
                                 "'num-examples'")
        weight = validate_weight(metrics["num-examples"], who)
        sent = self.crc_by_version.get(self.sent_version.get(msg.metadata.src_node_id, -1))
        if "global-crc" in metrics and sent is not None:
            crc = int(metric_scalar(metrics, "global-crc", who))
            if crc != sent:
                raise UpdateRejected(f"{who}: its copy of the global model differs from the "
                                     f"server's (crc {crc} != {sent})")
        fkeys = float_keys(self.global_state)
        expected = {k: tuple(self.global_state[k].shape) for k in fkeys}
        t0 = time.perf_counter()
        if PAYLOAD_KEY in content.array_records:
            payload = payload_from_record(content.array_records[PAYLOAD_KEY], who)
            update = decode_update(payload, max_elements=self.comp.max_update_elements).tensors
        elif ARRAYS_KEY in content.array_records:
            try:
                local = content.array_records[ARRAYS_KEY].to_torch_state_dict()
            except Exception as exc:  # malformed numpy payloads raise various errors
                raise UpdateRejected(f"{who}: arrays cannot be read: {exc}") from None
            validate_update({k: v.float() if v.is_floating_point() else v
                             for k, v in local.items() if k in expected}, expected, who)
            update = {k: local[k].float() - self.global_state[k] for k in fkeys}
        else:
            raise UpdateRejected(f"{who}: reply carries neither {PAYLOAD_KEY!r} nor "
                                 f"{ARRAYS_KEY!r}")
        self.comm.decode_seconds += time.perf_counter() - t0
        validate_update(update, expected, who)
        return DecodedReply(update=update, weight=weight, metrics=content)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.global_state is not None
        accepted: list[DecodedReply] = []
        ordered = sorted(replies, key=partition_of)
        for msg in ordered:
            node = msg.metadata.src_node_id
            size = message_bytes(msg)
            self.comm.uplink_bytes += size
            if msg.has_error():
                self._reject(msg, f"client error: {msg.error.reason}")
                continue
            part = partition_of(msg)
            self.node_partition[node] = part
            try:
                dec = self.decode_reply(msg)
                metrics = msg.content.metric_records[METRICS_KEY]
                if "encode-seconds" in metrics:
                    self.comm.encode_seconds += metric_scalar(metrics, "encode-seconds",
                                                              f"node {node}")
            except FedslimError as exc:
                self._reject(msg, str(exc))
                continue
            except Exception as exc:  # one bad reply must never take the server down
                self._reject(msg, f"unexpected {type(exc).__name__} while decoding: {exc}")
                continue
            self.comm.uplink_none_bytes += self._none_bytes(metrics)
            self.comm.per_client[str(part)] = {"uplink_bytes": size}
            self.node_version[node] = self.sent_version.get(node, -1)
            accepted.append(dec)
        self.last_num_replies = len(accepted)
        self.last_num_failures = len(ordered) - len(accepted)
        self.last_accepted, self.last_base = accepted, self.global_state
        if len(accepted) < self.min_train_nodes:
            log.warning("round %s: %d valid replies < min-train-nodes=%d; global model kept",
                        server_round + self.round_offset, len(accepted), self.min_train_nodes)
            self.last_train_metrics = None
            return None, None
        mean = weighted_mean([d.update for d in accepted], [d.weight for d in accepted])
        self._advance(apply_step(self.global_state, self.opt.step(mean)))
        metrics = aggregate_metrics([d.metrics for d in accepted], "num-examples")
        self.last_train_metrics = metrics
        return ArrayRecord(self.global_state), metrics

    def _advance(self, target: State) -> None:
        """Make ``target`` the next global version (through the downlink codec if any)."""
        assert self.global_state is not None
        if self.use_delta:
            fkeys = float_keys(self.global_state)
            wanted = {k: target[k] - self.global_state[k]
                      + self.down_residual.get(k, torch.zeros_like(target[k])) for k in fkeys}
            payload, sent = encode_update(wanted, self.downlink_spec,
                                          return_reconstruction=True)
            self.down_residual = {k: wanted[k] - sent[k] for k in fkeys}
            self.delta_payload = payload
            target = apply_delta(self.global_state, sent)
        self.global_state = target
        self.version += 1

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        for msg in replies:
            self.comm.uplink_eval_bytes += message_bytes(msg)
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.node_version.pop(node, None)
            else:
                self.node_version[node] = self.sent_version.get(node, -1)
        ok = [m for m in replies if not m.has_error()]
        metrics = aggregate_metrics([m.content for m in ok], "num-examples") if ok else None
        self.last_evaluate_metrics = metrics
        self.last_comm = self.comm.summary()
        return metrics

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"opt/{k}": v for k, v in self.opt.state_dict().items()}
        state.update({f"down_residual/{k}": v for k, v in self.down_residual.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.opt.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("opt/")})
        self.down_residual = {k[len("down_residual/"):]: v for k, v in state.items()
                              if k.startswith("down_residual/")}
