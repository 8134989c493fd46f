"""FedAvg as Flower's ``FedAvg``, made reproducible and resumable.

Differences from the stock strategy, all about reproducibility and reporting:

* node sampling is seeded by (seed, round) instead of the global ``random`` module;
* replies are sorted by ``partition-id`` before averaging, so float summation order does
  not depend on which client answered first;
* ``round_offset`` lets a resumed run continue the round numbering (clients derive their
  shuffling seed and learning-rate decay from the round);
* the last aggregated train / evaluate metrics are kept for the server's recorder.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedslim.strategies.common import aggregate_metrics, seeded_sample


def partition_of(msg: Message) -> int:
    """The ``partition-id`` a reply reports (-1 when absent), used to order replies."""
    if msg.has_error():
        return -1
    for rec in msg.content.metric_records.values():
        if "partition-id" in rec:
            return int(rec["partition-id"])
    return -1


class FedslimFedAvg(FedAvg):
    """Flower FedAvg with seeded sampling, ordered aggregation and a round offset."""

    def __init__(self, *, seed: int = 0, round_offset: int = 0, **kwargs: object) -> None:
        kwargs.setdefault("train_metrics_aggr_fn", aggregate_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", aggregate_metrics)
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.seed = seed
        self.round_offset = round_offset
        self.last_train_metrics: MetricRecord | None = None
        self.last_evaluate_metrics: MetricRecord | None = None
        self.last_num_replies = 0
        self.last_num_failures = 0

    # -- sampling -------------------------------------------------------------------
    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  grid: Grid, fraction: float, min_nodes: int, mtype: str) -> list[Message]:
        if fraction == 0.0:
            return []
        rnd = server_round + self.round_offset
        node_ids = seeded_sample(grid, self.min_available_nodes, fraction, min_nodes,
                                 self.seed, rnd, salt=0 if mtype == MessageType.TRAIN else 1)
        config["server-round"] = rnd
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return list(self._construct_messages(record, node_ids, mtype))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, grid, self.fraction_train,
                              self.min_train_nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._messages(server_round, arrays, config, grid, self.fraction_evaluate,
                              self.min_evaluate_nodes, MessageType.EVALUATE)

    # -- aggregation ----------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ordered = sorted(replies, key=partition_of)
        self.last_num_replies = sum(not m.has_error() for m in ordered)
        self.last_num_failures = len(ordered) - self.last_num_replies
        if self.last_num_replies < self.min_train_nodes:
            self.last_train_metrics = None
            return None, None  # keep the previous global model
        arrays, metrics = super().aggregate_train(server_round, ordered)
        self.last_train_metrics = metrics
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        metrics = super().aggregate_evaluate(server_round, sorted(replies, key=partition_of))
        self.last_evaluate_metrics = metrics
        return metrics

    # -- checkpointing --------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Strategy state to checkpoint (none for plain FedAvg)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        del state
