"""``sparse-training``: the global model's zeros stay zero through aggregation.

Clients mask their gradients (:func:`fedslim.task.prune.mask_gradients`), so their
updates are zero there; an aggregate can still move those weights (a server optimizer's
momentum, a hostile or stock client). :class:`KeepZeros` zeroes them again in every
aggregate, streaming or not, so the mask a pruned model started with holds for the
whole run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedslim.strategies.stream import StreamingStrategy, Update, streams
from fedslim.strategies.wrapper import StrategyWrapper


class KeepZeros(StrategyWrapper):
    """Zero the ``zeros`` entries (name -> bool mask) of every aggregate."""

    def __init__(self, strategy: Strategy, zeros: dict[str, torch.Tensor]) -> None:
        super().__init__(strategy)
        self.zeros = zeros
        self.streaming = streams(strategy)

    def _masked(self, arrays: ArrayRecord | None, metrics: MetricRecord | None
                ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if arrays is None or not self.zeros:
            return arrays, metrics
        state = arrays.to_torch_state_dict()
        for name, m in self.zeros.items():
            if name in state and state[name].shape == m.shape:
                state[name] = state[name].masked_fill(m, 0.0)
        return ArrayRecord(state), metrics

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self._masked(*self.strategy.aggregate_train(server_round, replies))

    def aggregate_updates(self, server_round: int, updates: Sequence[Update]
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        inner = self.strategy
        assert isinstance(inner, StreamingStrategy)
        return self._masked(*inner.aggregate_updates(server_round, updates))
