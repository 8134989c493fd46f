"""fedslim's default inner strategy: Flower's FedAvg, reproducible, with server optimizers.

Differences from the stock strategy:

* node sampling is seeded by (seed, round) instead of the global ``random`` module, so a
  resumed run samples the same nodes as an uninterrupted one;
* replies are averaged in a fixed order (partition id, then node id) and in float64, as
  the mean *step* from the current global model, so float summation does not depend on
  which client answered first;
* the mean step goes through a server optimizer (:class:`ServerOptimizer`: plain FedAvg,
  FedAvgM momentum or FedAdam), whose state is checkpointed (:meth:`state_dict`);
* a round with fewer than ``min_train_nodes`` valid replies keeps the global model.

It aggregates plain weights like any Flower strategy; compression is the job of the
:class:`~fedslim.strategies.compressed.Compressed` wrapper around it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedslim.config import ServerOpt
from fedslim.errors import FedslimError
from fedslim.flower_io import state_record, to_state
from fedslim.protocol import SERVER_ROUND
from fedslim.strategies.aggregate import ServerOptimizer, apply_step, float_keys, weighted_mean
from fedslim.strategies.common import aggregate_metrics, discover_partitions, seeded_sample
from fedslim.strategies.stream import Update
from fedslim.strategies.uplink import check_weight, reply_order

log = logging.getLogger("flwr").getChild("fedslim")


class FedslimFedAvg(FedAvg):
    """Flower FedAvg with seeded sampling, ordered float64 averaging and a server optimizer."""

    def __init__(self, *, seed: int = 0, server_opt: ServerOpt = ServerOpt.AVG,
                 server_lr: float = 1.0, server_momentum: float = 0.9,
                 **kwargs: Any) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_metrics)
        super().__init__(**kwargs)
        self.seed = seed
        self.opt = ServerOptimizer(server_opt, server_lr, server_momentum)
        self.current: dict[str, torch.Tensor] = {}
        self._current_arrays: ArrayRecord | None = None
        self.partitions: dict[int, int | None] = {}  # node id -> partition id (discovered)

    # -- sampling -------------------------------------------------------------------
    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid, fraction: float, min_nodes: int, mtype: str) -> list[Message]:
        if fraction == 0.0:
            return []
        if fraction < 1.0:  # which nodes a seed picks must not depend on random node ids
            discover_partitions(grid, self.partitions)
        node_ids = seeded_sample(grid, self.min_available_nodes, fraction, min_nodes,
                                 self.seed, server_round,
                                 salt=0 if mtype == MessageType.TRAIN else 1,
                                 partitions=self.partitions)
        config[SERVER_ROUND] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, node_ids, mtype))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if arrays is not self._current_arrays:
            self.current, self._current_arrays = to_state(arrays), arrays
        return self._messages(server_round, arrays, config, grid, self.fraction_train,
                              self.min_train_nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, grid, self.fraction_evaluate,
                              self.min_evaluate_nodes, MessageType.EVALUATE)

    # -- aggregation ----------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        steps, weights, contents = [], [], []
        keys = float_keys(self.current)
        for msg in sorted(replies, key=reply_order):
            if msg.has_error():
                continue
            who = f"node {msg.metadata.src_node_id}"
            try:
                weight = check_weight(next(iter(msg.content.metric_records.values()), None),
                                      who)
                local = to_state(msg.content[self.arrayrecord_key])  # type: ignore[arg-type]
                steps.append({k: local[k] - self.current[k] for k in keys})
            except (FedslimError, KeyError) as exc:
                log.warning("round %s: skipping reply from %s: %s", server_round, who, exc)
                continue
            weights.append(weight)
            contents.append(msg.content)
        if len(steps) < self.min_train_nodes:
            log.warning("round %s: %d valid replies < min-train-nodes=%d; global model kept",
                        server_round, len(steps), self.min_train_nodes)
            return None, None
        step = self.opt.step(weighted_mean(steps, weights))
        new = apply_step(self.current, step)
        self.current = new
        self._current_arrays = state_record(new)
        return self._current_arrays, self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    # -- streaming aggregation (see fedslim.strategies.stream) -------------------------
    streaming = True

    def aggregate_updates(self, server_round: int, updates: Sequence[Update]
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """:meth:`aggregate_train` one decoded update at a time: memory O(model).

        The same float32 steps are folded in the same order with the same float64
        coefficients as :func:`weighted_mean`, so the result is bit-identical.
        """
        items: list[tuple[Update, float]] = []
        for upd in sorted(updates, key=lambda u: reply_order(u.msg)):
            who = f"node {upd.msg.metadata.src_node_id}"
            try:
                items.append((upd, check_weight(
                    next(iter(upd.msg.content.metric_records.values()), None), who)))
            except FedslimError as exc:
                log.warning("round %s: skipping reply from %s: %s", server_round, who, exc)
        if len(items) < self.min_train_nodes:
            log.warning("round %s: %d valid replies < min-train-nodes=%d; global model kept",
                        server_round, len(items), self.min_train_nodes)
            return None, None
        keys = float_keys(self.current)
        total = float(sum(w for _, w in items))
        acc = {k: torch.zeros(self.current[k].shape, dtype=torch.float64) for k in keys}
        for upd, w in items:
            local = upd.weights()  # decoded now, dropped after this iteration
            for k in keys:
                acc[k].add_((local[k] - self.current[k]).to("cpu", torch.float64),
                            alpha=w / total)
            del local
        step = self.opt.step({k: v.to(torch.float32) for k, v in acc.items()})
        del acc
        self.current = apply_step(self.current, step)
        self._current_arrays = state_record(self.current)
        return self._current_arrays, self.train_metrics_aggr_fn(
            [u.msg.content for u, _ in items], self.weighted_by_key)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        ok = [m for m in sorted(replies, key=reply_order) if not m.has_error()]
        if not ok:
            return None
        return self.evaluate_metrics_aggr_fn([m.content for m in ok], self.weighted_by_key)

    # -- checkpointing --------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"opt/{k}": v for k, v in self.opt.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.opt.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("opt/")})
