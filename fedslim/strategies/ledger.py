"""Byte ledger: every message a strategy sends or receives, measured as Flower serializes it.

The size of a message is the sum of its inflatable objects' serialized lengths (message
header, RecordDict, each record and each array) -- what Flower puts on the wire, not
``numel * 4``. ``uplink_none_bytes`` is the same measure taken on the plain-float32
version of each train reply (the reply handed to the wrapped strategy), so the uplink ratio
compares like with like and is exactly 1.0 for ``uplink=none``. ``downlink_none_bytes`` is
the size of each instruction as the wrapped strategy made it (the full float32 model), so
``total_ratio`` is all traffic, both directions, against stock Flower's.
"""

from __future__ import annotations

from flwr.app import Message, MessageType

from fedslim.flower_io import message_bytes
from fedslim.report import CommReport, NodeBytes, ratio


class ByteLedger:
    """Accumulates one round's :class:`~fedslim.report.CommReport`."""

    def __init__(self) -> None:
        self.report = CommReport()

    def reset(self) -> None:
        self.report = CommReport()

    def _node(self, node: int) -> NodeBytes:
        return self.report.per_node.setdefault(str(node), NodeBytes())

    def sent(self, msg: Message, kind: str, plain: int | None = None,
             size: int | None = None) -> int:
        """Count an instruction; ``kind``: ``full``, ``delta``, ``current``, ``init``, ``key``;
        ``plain``: its size as the wrapped strategy made it (default: as sent); ``size``:
        its serialized size when the caller measured it already."""
        size = message_bytes(msg) if size is None else size
        r = self.report
        r.downlink_none_bytes += size if plain is None else plain
        if msg.metadata.message_type == MessageType.TRAIN:
            r.downlink_bytes += size
        else:
            r.downlink_eval_bytes += size
        r.full_model_messages += kind == "full"
        r.delta_messages += kind == "delta"
        r.current_messages += kind == "current"
        r.init_messages += kind == "init"
        r.key_messages += kind == "key"
        self._node(msg.metadata.dst_node_id).downlink_bytes += size
        return size

    def received(self, msg: Message) -> int:
        """Count a reply (train or evaluate, accepted or not)."""
        size = message_bytes(msg)
        if msg.metadata.message_type == MessageType.TRAIN:
            self.report.uplink_bytes += size
        else:
            self.report.uplink_eval_bytes += size
        self._node(msg.metadata.src_node_id).uplink_bytes += size
        return size

    def plain_equivalent(self, size: int) -> None:
        """Add the size a train reply would have had with plain float32 arrays."""
        self.report.uplink_none_bytes += size

    def allocation(self, kept: dict[str, int]) -> None:
        """Add one decoded reply's values-sent-per-tensor (averaged over replies on close)."""
        if not kept:
            return
        r = self.report
        r.kept_replies += 1
        for name, count in kept.items():
            r.kept_per_tensor[name] = r.kept_per_tensor.get(name, 0.0) + count

    def timing(self, encode_seconds: float = 0.0, decode_seconds: float = 0.0,
               node_decode_seconds: float = 0.0) -> None:
        self.report.encode_seconds += encode_seconds
        self.report.decode_seconds += decode_seconds
        self.report.node_decode_seconds += node_decode_seconds

    def close(self) -> CommReport:
        r = self.report
        r.uplink_ratio = ratio(r.uplink_none_bytes, r.uplink_bytes)
        r.total_ratio = ratio(r.total_none_bytes, r.total_bytes) or 0.0
        if r.kept_replies:
            r.kept_per_tensor = {k: v / r.kept_replies for k, v in r.kept_per_tensor.items()}
        return r
