"""``Compressed(strategy)``: fedslim's update compression around ANY Flower strategy.

On the way out (``configure_*``) the wrapper takes the wrapped strategy's messages and,
per node, replaces the model arrays by what that node needs (the full model, a compressed
delta from the version it holds, or nothing) and adds a
:class:`~fedslim.protocol.DownlinkHeader` telling the node's
:func:`~fedslim.client.mod.compression_mod` how to encode its reply. On the way in
(``aggregate_*``) it decodes and validates each reply
(:class:`~fedslim.strategies.uplink.UplinkDecoder`), rejects bad ones with node and reason,
and hands the wrapped strategy plain ``ArrayRecord`` weights (base + decoded update), so
FedAvg, FedAdam, FedProx, Krum, FedTrimmedAvg or a DP wrapper aggregate them unchanged. The
new global model goes back through the downlink codec
(:class:`~fedslim.strategies.downlink.Downlink`). Every message is measured by a
:class:`~fedslim.strategies.ledger.ByteLedger`; what happened is reported into a
:class:`~fedslim.report.RoundCollector`.

The default, ``uplink="auto"`` and ``downlink="auto"``, compresses both directions with
the :class:`~fedslim.compression.auto.AutoSpec` pipeline: each tensor keeps the fewest
values holding a fixed fraction of its update's energy, so the bytes follow the model. With
``uplink="none"`` and ``downlink="none"`` messages pass through untouched: the federation
is stock Flower's, bit for bit, plus validation and byte accounting.

Order when stacking with Flower's DP wrappers: ``Compressed(DifferentialPrivacy...(s))`` --
the DP wrapper must see plain weights.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedslim.compression import PipelineSpec, parse_spec
from fedslim.compression.auto import DOWNLINK_AUTO, AutoSpec, parse_auto, resolve
from fedslim.errors import FedslimError
from fedslim.flower_io import content_bytes, message_bytes, to_state, unfold_reply
from fedslim.protocol import (
    DELTA,
    DOWN,
    INIT_FAILED,
    PARTITION_ID,
    UP,
    DownlinkHeader,
    UplinkHeader,
)
from fedslim.report import Reject, RoundCollector, RoundReport
from fedslim.strategies.aggregate import State, float_keys
from fedslim.strategies.downlink import Downlink
from fedslim.strategies.ledger import ByteLedger
from fedslim.strategies.reasons import short_reason
from fedslim.strategies.stream import (
    StreamingStrategy,
    Update,
    WeightsFn,
    streams,
    update_norm,
)
from fedslim.strategies.uplink import (
    Expected,
    UplinkDecoder,
    check_metrics,
    check_weight,
    partition_of,
)
from fedslim.strategies.wrapper import StrategyWrapper

log = logging.getLogger("flwr").getChild("fedslim")


def scalar_metrics(rec: MetricRecord | None) -> dict[str, float]:
    """The finite scalar entries of an aggregated MetricRecord (lists are dropped)."""
    out: dict[str, float] = {}
    for k, v in (rec or {}).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def model_record_key(content: RecordDict, arrays: ArrayRecord) -> str | None:
    """The name of the record that carries the global model in an outgoing message."""
    for key, rec in content.array_records.items():
        if rec is arrays:
            return key
    names = list(arrays.keys())
    for key, rec in content.array_records.items():
        if list(rec.keys()) == names:
            return key
    return None


Pipeline = str | PipelineSpec | AutoSpec


def as_pipeline(value: Pipeline) -> PipelineSpec | AutoSpec:
    """A spec string (``auto`` and ``auto:...`` included) parsed; parsed values as they are.

    Raises
    ------
    SpecError
        If the text is neither ``auto[:...]`` nor a valid pipeline spec.
    """
    if isinstance(value, PipelineSpec | AutoSpec):
        return value
    auto = parse_auto(value) if isinstance(value, str) else None
    return auto if auto is not None else parse_spec(value)


class Compressed(StrategyWrapper):
    """Compress what ``strategy`` sends and receives; validate and account every reply.

    Parameters
    ----------
    strategy : Strategy
        Any Flower strategy working on plain ``ArrayRecord`` weights.
    uplink, downlink : str, PipelineSpec or AutoSpec
        Pipelines for client updates and for the global model's steps: ``auto`` (the
        default, :mod:`fedslim.compression.auto`), a spec such as ``topk:0.01|q:4``, or
        ``none`` (plain float32, as stock Flower). ``downlink="auto"`` is ``none`` when the
        uplink is ``none``.
    error_feedback : bool
        Clients keep what their codec dropped and add it to their next update.
    warmup_rounds : int
        DGC-style sparsity warm-up of the uplink's top-k density.
    seed : int
        Seeds the clients' stochastic rounding (with node and round).
    collector : RoundCollector, optional
        Where round reports go (a private one if not given; see :attr:`collector`).
    bind : bool
        Frame every message even with ``uplink="none"`` and ``downlink="none"``: replies
        must then carry the header that binds them to the round and version they answer
        (replay protection, CRC of the node's copy), so every client needs the mod.
    shared_init : bool
        The initial arrays are the run's seeded round-0 model, which every node can
        build itself (fedslim's ClientApp does; a ClientApp whose ``compression_mod`` was
        made with ``initial_state``): nodes are not sent it, and prove by CRC that they
        hold it. A node that cannot gets the full model.
    keyframe_every, keyframe : int, str
        With a compressing ``downlink`` and ``shared_init``: every ``keyframe_every``-th
        version is a keyframe, the model's drift from the round-0 model through the
        ``keyframe`` pipeline, which a node too far behind for a catch-up chain gets
        instead of the full model (see :mod:`fedslim.strategies.downlink`). 0: none.
    """

    def __init__(self, strategy: Strategy, *, uplink: Pipeline = "auto",
                 downlink: Pipeline = "auto", error_feedback: bool = True,
                 warmup_rounds: int = 0, seed: int = 0,
                 collector: RoundCollector | None = None, shared_init: bool = False,
                 bind: bool = False, stream: bool = True, ef_reset_after: int = 0,
                 keyframe_every: int = 0, keyframe: str | PipelineSpec = "q:8|ans") -> None:
        super().__init__(strategy, collector, reports=True)
        self.collector: RoundCollector = self.collector or RoundCollector()
        if isinstance(strategy, StrategyWrapper):  # one stack, one collector
            strategy.share_collector(self.collector)
        up, down = as_pipeline(uplink), as_pipeline(downlink)
        if isinstance(downlink, str) and downlink.strip() == "auto":
            # "auto" follows the uplink: plain both ways, or the adaptive downlink
            down = PipelineSpec() if isinstance(up, PipelineSpec) and up.is_identity \
                else DOWNLINK_AUTO
        self.settings = (up, down)  # as given (``auto`` stays ``auto``), for the summary
        self.uplink = resolve(up)
        if not 0 <= keyframe_every <= Downlink.MAX_CHAIN:
            raise ValueError(f"keyframe_every must be in [0, {Downlink.MAX_CHAIN}], got "
                             f"{keyframe_every}")
        self.downlink = Downlink(resolve(down), key_every=keyframe_every,
                                 key_spec=parse_spec(keyframe))
        self.error_feedback = error_feedback
        self.ef_reset_after = ef_reset_after
        self.warmup_rounds = warmup_rounds
        self.seed = seed
        self.plain = self.uplink.is_identity and not self.downlink.compress and not bind
        self.stream = secrets.randbits(31)
        self.lineage = secrets.randbits(62) | 1  # kept across resumptions (checkpointed)
        self.ledger = ByteLedger()
        self.decoder = UplinkDecoder()
        self._arrays_key: str | None = None
        self._model_bytes: tuple[ArrayRecord | None, int] = (None, 0)  # see _plain_size
        self._train_sent = 0  # train messages of the current round
        self._round = 0
        self.aggregate_seconds = 0.0  # the wrapped strategy's last aggregate_train
        self.shared_init = shared_init and self.downlink.compress
        self.streaming_wanted = stream
        # the last federated evaluation: (round, client -> accuracy on its own split)
        self.client_accuracy: tuple[int, dict[str, float]] = (0, {})

    def summary(self) -> None:
        up, down = self.settings
        log.info("\t├──> fedslim compression: uplink=%s downlink=%s error-feedback=%s",
                 _shown(up), _shown(down), self.error_feedback)
        super().summary()

    def uplink_at(self, server_round: int) -> PipelineSpec:
        return self.uplink.at_round(max(server_round, 1), self.warmup_rounds)

    # ------------------------------------------------------------------ downlink
    def _report(self, server_round: int) -> RoundReport:
        return self.collector.open(server_round)

    def _outgoing(self, messages: Iterable[Message], arrays: ArrayRecord,
                  server_round: int) -> list[Message]:
        out = []
        for msg in messages:
            key = None if self.plain else model_record_key(msg.content, arrays)
            if key is None:  # stock message (or one without the model): untouched
                self.ledger.sent(msg, "full")
                out.append(msg)
                continue
            self._arrays_key = key
            node = msg.metadata.dst_node_id
            content, kind, base = self.downlink.content_for(node, msg.content, key)
            content[DOWN] = DownlinkHeader(
                stream=self.stream, version=self.downlink.version, base=base, arrays_key=key,
                uplink=str(self.uplink_at(server_round)), error_feedback=self.error_feedback,
                keep=self.downlink.compress, server_round=server_round,
                seed=self.seed, lineage=self.lineage, ef_reset_after=self.ef_reset_after,
                init_crc=self.downlink.init_crc if kind in ("init", "key") else 0).to_record()
            new = Message(content=content, dst_node_id=node,
                          message_type=msg.metadata.message_type,
                          group_id=msg.metadata.group_id)
            size = message_bytes(new)  # serialized once: for the ledger and its plain size
            plain = self._plain_size(new, size, kind, msg.content.array_records[key])
            self.ledger.sent(new, kind, plain, size)
            out.append(new)
        return out

    def _plain_size(self, sent: Message, size: int, kind: str, model: ArrayRecord) -> int:
        """``sent``'s size (``size``, as serialized) as the wrapped strategy made it:
        without fedslim's header and chain, with the full model (measured once per model)."""
        if self._model_bytes[0] is not model:
            self._model_bytes = (model, content_bytes(model))
        ours = [sent.content[k] for k in (DOWN, DELTA) if k in sent.content]
        size -= sum(content_bytes(record) for record in ours)
        return size + (self._model_bytes[1] if kind != "full" else 0)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._report(server_round)
        self.ledger.reset()
        self._round = server_round
        self.downlink.sync(arrays)
        if self.shared_init and not self.downlink.init_version:
            self.downlink.share_init()
        msgs = self._outgoing(self.strategy.configure_train(server_round, arrays, config,
                                                            grid), arrays, server_round)
        self._train_sent = len(msgs)
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._report(server_round)
        self.downlink.sync(arrays)
        msgs = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        return self._outgoing(msgs, arrays, server_round)

    # ------------------------------------------------------------------ uplink
    def _reject(self, report: RoundReport, msg: Message, phase: str, reason: str) -> None:
        node = msg.metadata.src_node_id
        self.downlink.forget(node, init_failed=INIT_FAILED in reason)
        part = partition_of(msg)
        reason = short_reason(reason)
        log.warning("rejected %s reply from node %s (partition %s): %s", phase, node, part,
                    reason)
        report.rejects.append(Reject(node=node, phase=phase, reason=reason, partition=part))

    def _expected(self, node: int, server_round: int) -> Expected:
        return Expected(stream=self.stream, version=self.downlink.sent.get(node, -1),
                        server_round=server_round, crc=self.downlink.crc,
                        arrays_key=self._arrays_key or "arrays",
                        spec=self.uplink_at(server_round), framed=not self.plain)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        report = self._report(server_round)
        ordered = list(replies)  # arrival order, as the wrapped strategy would see it
        stream = self.streaming_wanted and streams(self.strategy)
        accepted: list[Message] = []
        updates: list[Update] = []
        base = self.downlink.state
        keys = float_keys(base)
        for msg in ordered:
            size = self.ledger.received(msg)
            if msg.has_error():
                self._reject(report, msg, "train",
                             f"client error: {short_reason(msg.error.reason or '')}")
                continue
            node = msg.metadata.src_node_id
            exp = self._expected(node, server_round)
            try:
                unfold_reply(msg.content, f"node {node}")  # compact form -> usual records
                dec = self.decoder.decode(msg, base, exp)
            except FedslimError as exc:
                self._reject(report, msg, "train", str(exc))
                continue
            except Exception as exc:  # one bad reply must never take the server down
                self._reject(report, msg, "train",
                             f"unexpected {type(exc).__name__} while decoding: {exc}")
                continue
            if not self.plain:  # plain mode: the reply is already what the strategy wants
                sent = msg.content
                msg.content = dec.content
                size = message_bytes(msg)
                if stream:  # keep the reply as sent; its weights are decoded when folded
                    msg.content = sent
            self.ledger.timing(dec.encode_seconds, dec.decode_seconds, dec.node_decode_seconds)
            self.ledger.allocation(dec.kept)
            self.ledger.plain_equivalent(size)
            self.downlink.acknowledge(node)
            accepted.append(msg)
            if stream:
                updates.append(Update(msg, self._redecode(msg, base, exp), base,
                                      update_norm(dec.weights, base, keys)))
            del dec
        # a node that never answered (timeout, crash) is a failure too, not just absent
        report.silent = max(0, self._train_sent - len(ordered))
        report.replies = len(accepted)
        report.failures = len(ordered) - len(accepted) + report.silent
        if not accepted:
            log.warning("round %s: no valid train reply; the global model is kept",
                        server_round)
            return None, None
        t0 = time.perf_counter()
        if stream:
            inner = self.strategy
            assert isinstance(inner, StreamingStrategy)
            arrays, metrics = inner.aggregate_updates(server_round, updates)
        else:
            arrays, metrics = self.strategy.aggregate_train(server_round, accepted)
        self.aggregate_seconds = time.perf_counter() - t0
        report.train = scalar_metrics(metrics)
        if arrays is None:
            return None, metrics
        report.aggregated = True
        return self.downlink.publish(to_state(arrays)), metrics

    def _redecode(self, msg: Message, base: State, exp: Expected) -> WeightsFn:
        """Decode ``msg`` again when its update is folded (it was validated already)."""
        plain = self.plain

        def weights() -> State:
            if plain:
                return to_state(msg.content.array_records[exp.arrays_key])
            return self.decoder.decode(msg, base, exp, materialize=False).weights

        return weights

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        report = self._report(server_round)
        ok: list[Message] = []
        accuracy: dict[str, float] = {}
        for msg in replies:
            self.ledger.received(msg)
            if msg.has_error():
                self._reject(report, msg, "evaluate",
                             f"client error: {short_reason(msg.error.reason or '')}")
                continue
            try:
                metrics = next(iter(msg.content.metric_records.values()), None)
                check_weight(metrics, f"node {msg.metadata.src_node_id}", allow_zero=True)
                check_metrics(metrics, f"node {msg.metadata.src_node_id}")  # type: ignore[arg-type]
            except FedslimError as exc:
                self._reject(report, msg, "evaluate", str(exc))
                continue
            self._evaluate_ack(msg, server_round)
            ok.append(msg)
            _client_accuracy(accuracy, msg)
        self.client_accuracy = (server_round, accuracy)
        report.evaluate_replies = len(ok)
        report.evaluate_failures = sum(r.phase == "evaluate" for r in report.rejects)
        metrics = self.strategy.aggregate_evaluate(server_round, ok) if ok else None
        report.federated_evaluate = scalar_metrics(metrics)
        report.comm = self.ledger.close()
        return metrics

    def _evaluate_ack(self, msg: Message, server_round: int) -> None:
        """Trust a node's copy only if its reply says it holds exactly what was sent.

        A stock client (no mod) evaluates the full model fine but keeps nothing: it must
        get the full model again, so its evaluation counts but is not an acknowledgment.
        """
        node = msg.metadata.src_node_id
        rec = msg.content.config_records.get(UP)
        if rec is None:
            self.downlink.forget(node)
            return
        try:
            header = UplinkHeader.from_record(rec, f"node {node}")
            UplinkDecoder.check_binding(header, self._expected(node, server_round),
                                        f"node {node}")
        except FedslimError as exc:
            log.warning("evaluate reply from node %s: %s; it gets the full model next", node,
                        exc)
            self.downlink.forget(node)
        else:
            self.downlink.acknowledge(node)
        del msg.content[UP]

    # ------------------------------------------------------------------ checkpoint
    def own_state(self) -> dict[str, torch.Tensor]:
        state = {f"downlink/{k}": v for k, v in self.downlink.state_dict().items()}
        state["lineage"] = torch.tensor([self.lineage], dtype=torch.int64)
        return state

    def load_own_state(self, state: dict[str, torch.Tensor]) -> None:
        if "lineage" in state:
            self.lineage = int(state["lineage"].item())

        self.downlink.load_state_dict({k[len("downlink/"):]: v for k, v in state.items()
                                       if k.startswith("downlink/")})


ACCURACY_KEYS = ("eval-accuracy", "eval_acc", "accuracy")
"""Where an evaluate reply's accuracy is (fedslim's ClientApp, Flower's quickstarts)."""


def _client_accuracy(into: dict[str, float], msg: Message) -> None:
    """Note a (validated) evaluate reply's own-split accuracy, if it has one, under its
    partition id (a claimed one already taken, or none: its node id)."""
    metrics = scalar_metrics(next(iter(msg.content.metric_records.values()), None))
    acc = next((metrics[k] for k in ACCURACY_KEYS if k in metrics), None)
    if acc is None or not 0.0 <= acc <= 1.0 or metrics.get("num-examples", 1) <= 0:
        return
    pid = metrics.get(PARTITION_ID)
    who = f"partition-{int(pid)}" if pid is not None and float(pid).is_integer() else ""
    into[who if who and who not in into else f"node-{msg.metadata.src_node_id}"] = acc


def _shown(pipeline: PipelineSpec | AutoSpec) -> str:
    return f"{pipeline} ({pipeline.spec})" if isinstance(pipeline, AutoSpec) else str(pipeline)
