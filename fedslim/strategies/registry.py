"""Strategy registry: ``strategy=<name>`` -> a factory building the *inner* strategy.

fedslim's ServerApp wraps whatever this returns in ``Compressed`` (and ``Distilled``), so
every registered strategy gets compression, validation and byte accounting. Names are
checked when the run config is parsed; this module imports Flower only inside the
factories, so ``fedslim.config`` can validate names without importing Flower.

Register your own (from a plug-in module)::

    from fedslim.strategies.registry import register_strategy

    @register_strategy("my-fedavg")
    def my_fedavg(cfg):                 # cfg: fedslim.config.RunConfig
        from flwr.serverapp.strategy import FedAvg
        return FedAvg(**common_kwargs(cfg))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fedslim.registry import Registry

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from fedslim.config import RunConfig

StrategyFactory = Callable[["RunConfig"], "Strategy"]
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")
register_strategy = STRATEGIES.register


def build_strategy(cfg: RunConfig) -> Strategy:
    """The inner strategy named by ``cfg.fed.strategy``."""
    return STRATEGIES[cfg.fed.strategy](cfg)


def common_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """The sampling arguments every Flower strategy takes, from the run config."""
    return {"fraction_train": cfg.fed.fraction_train,
            "fraction_evaluate": cfg.fed.fraction_evaluate,
            "min_train_nodes": cfg.fed.min_train_nodes,
            "min_evaluate_nodes": min(cfg.fed.min_train_nodes, cfg.fed.min_available_nodes),
            "min_available_nodes": cfg.fed.min_available_nodes}


def _metrics_fns() -> dict[str, Any]:
    from fedslim.strategies.common import aggregate_metrics

    # Flower's default metric aggregation raises on a list or a huge num-examples from a
    # client; fedslim's ignores what it cannot average.
    return {"train_metrics_aggr_fn": aggregate_metrics,
            "evaluate_metrics_aggr_fn": aggregate_metrics}


@register_strategy("fedslim")
def _fedslim(cfg: RunConfig) -> Strategy:
    from fedslim.config import ServerOpt
    from fedslim.strategies.fedavg import FedslimFedAvg

    adam = cfg.comp.server_opt is ServerOpt.ADAM
    return FedslimFedAvg(seed=cfg.fed.seed, server_opt=cfg.comp.server_opt,
                         server_lr=cfg.comp.server_lr_for(adam),
                         server_momentum=cfg.comp.server_momentum, **common_kwargs(cfg))


@register_strategy("fedavg")
def _fedavg(cfg: RunConfig) -> Strategy:
    from flwr.serverapp.strategy import FedAvg

    return FedAvg(**common_kwargs(cfg), **_metrics_fns())


@register_strategy("fedavgm")
def _fedavgm(cfg: RunConfig) -> Strategy:
    from flwr.serverapp.strategy import FedAvgM

    return FedAvgM(**common_kwargs(cfg), **_metrics_fns(),
                   server_learning_rate=cfg.comp.server_lr_for(adam=False),
                   server_momentum=cfg.comp.server_momentum)


@register_strategy("fedadam")
def _fedadam(cfg: RunConfig) -> Strategy:
    from flwr.serverapp.strategy import FedAdam

    return FedAdam(**common_kwargs(cfg), **_metrics_fns(), eta=cfg.comp.server_lr_for(adam=True),
                   beta_1=cfg.comp.server_momentum)


@register_strategy("fedprox")
def _fedprox(cfg: RunConfig) -> Strategy:
    from flwr.serverapp.strategy import FedProx

    return FedProx(**common_kwargs(cfg), **_metrics_fns(), proximal_mu=cfg.fed.proximal_mu)


@register_strategy("fedtrimmedavg")
def _fedtrimmedavg(cfg: RunConfig) -> Strategy:
    from flwr.serverapp.strategy import FedTrimmedAvg

    return FedTrimmedAvg(**common_kwargs(cfg), **_metrics_fns(), beta=cfg.fed.trimmed_beta)


@register_strategy("krum")
def _krum(cfg: RunConfig) -> Strategy:
    from flwr.serverapp.strategy import Krum

    return Krum(**common_kwargs(cfg), **_metrics_fns(),
                num_malicious_nodes=cfg.fed.malicious_nodes)


@register_strategy("multikrum")
def _multikrum(cfg: RunConfig) -> Strategy:
    """Flower's MultiKrum averaging the ``n - malicious-nodes`` best-scored replies of each
    round (Krum keeps ONE client's model per round, which on non-IID data is that
    client's bias: 0.515 on the digits benchmark with no attack)."""
    from flwr.app import ArrayRecord, Message, MetricRecord
    from flwr.serverapp.strategy import MultiKrum

    class RoundMultiKrum(MultiKrum):
        def aggregate_train(self, server_round: int, replies: Any
                            ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            ok = [m for m in replies if isinstance(m, Message) and not m.has_error()]
            self.num_nodes_to_select = max(1, len(ok) - self.num_malicious_nodes)
            return super().aggregate_train(server_round, replies)

    return RoundMultiKrum(**common_kwargs(cfg), **_metrics_fns(),
                          num_malicious_nodes=cfg.fed.malicious_nodes)


@register_strategy("fedmedian")
def _fedmedian(cfg: RunConfig) -> Strategy:
    from flwr.serverapp.strategy import FedMedian

    return FedMedian(**common_kwargs(cfg), **_metrics_fns())
