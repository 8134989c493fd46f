"""Streaming aggregation: the server never holds more than one decoded update at a time.

A decoded update is the size of the model (float32), while the reply that carried it is
as small as its compression made it. :class:`~fedslim.strategies.compressed.Compressed`
therefore decodes a reply once to validate it, keeps only the (small) reply and a few
scalars (its weight and update norm), and hands the layers inside it :class:`Update`
objects that decode again when asked. A layer that can fold updates one at a time says so
with ``streaming = True`` and implements ``aggregate_updates``; fedslim's own layers do
(``Guarded`` -> ``Distilled`` -> ``FedslimFedAvg``), so with them the server's memory is
O(model + replies as sent), not O(clients x model). A stock Flower strategy needs every
reply's weights at once (``aggregate_arrayrecords``), so ``Compressed`` materializes them
for it, as before.

The result is bit-identical to aggregating materialized replies: the same float32 values
are folded in the same order with the same float64 coefficients (tested).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from fedslim.strategies.aggregate import State, float_keys

WeightsFn = Callable[[], State]


class Update:
    """One accepted train reply; its weights (base + update) are decoded when asked.

    ``scale`` (set by a defence layer) shrinks the update: the weights returned are
    ``base + (decoded - base) * scale`` for float entries. ``norm`` is the L2 norm of the
    unscaled update, measured while the reply was validated.
    """

    __slots__ = ("msg", "base", "norm", "scale", "_decode")

    def __init__(self, msg: Message, decode: WeightsFn, base: State, norm: float) -> None:
        self.msg, self.base, self.norm, self.scale = msg, base, norm, 1.0
        self._decode = decode

    def weights(self) -> State:
        """Decode now (nothing is kept): the reply's weights, after ``scale``."""
        local = self._decode()
        if self.scale == 1.0:
            return local
        keys = set(float_keys(self.base))
        return {k: (self.base[k] + (v - self.base[k]) * self.scale) if k in keys else v
                for k, v in local.items()}


@runtime_checkable
class StreamingStrategy(Protocol):
    """A strategy that folds :class:`Update` objects one at a time."""

    streaming: bool

    def aggregate_updates(self, server_round: int, updates: Sequence[Update]
                          ) -> tuple[ArrayRecord | None, MetricRecord | None]: ...


def streams(strategy: Strategy) -> bool:
    """Whether ``strategy`` (and everything it wraps) aggregates :class:`Update` objects."""
    return isinstance(strategy, StreamingStrategy) and strategy.streaming is True


def update_norm(local: State, base: State, keys: Sequence[str]) -> float:
    """L2 norm of ``local - base`` over ``keys``, accumulated in float64."""
    total = 0.0
    for k in keys:
        total += float(torch.sum((local[k].double() - base[k].double()) ** 2))
    return math.sqrt(total)
