"""Strategy wrappers, Flower's way: hold an inner strategy and intercept its hooks.

Flower adds a capability to *any* strategy by wrapping it (its DP wrappers do this);
fedslim's compression, distillation and round offset are wrappers too, so they stack:
``Offset(Compressed(Distilled(FedAdam(...))))``.

A part that carries state across rounds (optimizer moments, residuals, a student) is
:class:`Stateful`; a wrapper's :meth:`StrategyWrapper.state_dict` includes its inner
strategy's under ``inner/``, so the ServerApp checkpoints the whole stack through the
outermost object. Stock Flower strategies are not Stateful; their state (e.g. FedAdam's
moments) is not checkpointed, so resuming such a run is not exact.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedslim.errors import FedslimError
from fedslim.report import RoundCollector

INNER = "inner/"


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


def state_of(obj: object) -> dict[str, torch.Tensor]:
    return obj.state_dict() if isinstance(obj, Stateful) else {}


def load_state_of(obj: object, state: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, Stateful):
        obj.load_state_dict(state)


class StrategyWrapper(Strategy):
    """Delegates every hook to ``strategy``; subclasses override the ones they change.

    A wrapper that reports (``collector``) and was not given one joins the collector of
    the wrapper around it (:meth:`share_collector`), so one stack reports into one place.
    """

    def __init__(self, strategy: Strategy, collector: RoundCollector | None = None,
                 reports: bool = False) -> None:
        self.strategy = strategy
        self.collector: RoundCollector | None = (
            (collector if collector is not None else RoundCollector()) if reports else None)
        self._collector_given = collector is not None

    def share_collector(self, collector: RoundCollector) -> None:
        """Report into ``collector`` (unless given one), and make inner wrappers do so."""
        if self.collector is not None and not self._collector_given:
            self.collector = collector
        if isinstance(self.strategy, StrategyWrapper):
            self.strategy.share_collector(collector)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()

    # -- checkpointing -----------------------------------------------------------------
    def own_state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_own_state(self, state: dict[str, torch.Tensor]) -> None:
        del state

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.own_state()
        state.update({INNER + k: v for k, v in state_of(self.strategy).items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_own_state({k: v for k, v in state.items() if not k.startswith(INNER)})
        load_state_of(self.strategy, {k[len(INNER):]: v for k, v in state.items()
                                      if k.startswith(INNER)})


class Offset(StrategyWrapper):
    """Shifts round numbers by ``offset`` (a resumed run continues its numbering).

    ``Strategy.start`` counts rounds from 1; clients derive learning-rate decay and
    shuffling seeds from ``server-round``, so a run resumed after round ``k`` must tell
    the inner strategy (and through it the clients) ``k + 1``, ``k + 2``, ...
    """

    def __init__(self, strategy: Strategy, offset: int) -> None:
        super().__init__(strategy)
        self.offset = offset

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config,
                                                grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    # Transparent for checkpoints: a resumed run (with an Offset) and the original (without)
    # must read each other's state.
    def state_dict(self) -> dict[str, torch.Tensor]:
        return state_of(self.strategy)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_state_of(self.strategy, state)


class NodesUnavailable(FedslimError):
    """Fewer nodes than needed stayed connected for longer than the configured wait."""


def wait_for_nodes(grid: Grid, needed: int, timeout: float, poll: float = 0.5) -> int:
    """Wait until ``needed`` nodes are connected; raise after ``timeout`` seconds.

    Flower's own sampling waits forever (logging a line every second); a run that can
    never start, or whose nodes died, must end with an error instead.
    """
    deadline = time.monotonic() + timeout
    while (have := len(list(grid.get_node_ids()))) < needed:
        if time.monotonic() >= deadline:
            raise NodesUnavailable(f"{have} node(s) connected, {needed} needed "
                                   f"(min-available-nodes / min-train-nodes) after waiting "
                                   f"{timeout:.0f}s (node-timeout)")
        time.sleep(poll)
    return have


class NodeGuard(StrategyWrapper):
    """Before each configure step, wait (bounded) for ``min_nodes`` connected nodes."""

    def __init__(self, strategy: Strategy, min_nodes: int, timeout: float) -> None:
        super().__init__(strategy)
        self.min_nodes, self.timeout = min_nodes, timeout

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        wait_for_nodes(grid, self.min_nodes, self.timeout)
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        wait_for_nodes(grid, self.min_nodes, self.timeout)
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return state_of(self.strategy)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_state_of(self.strategy, state)
