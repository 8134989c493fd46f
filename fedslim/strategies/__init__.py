"""Flower strategies and strategy wrappers.

* :class:`Compressed` -- fedslim's update compression around ANY Flower strategy;
* :class:`Distilled` / :class:`Distiller` -- server-side distillation into a compact student;
* :class:`FedslimFedAvg` -- FedAvg with seeded sampling, float64 averaging, server optimizers;
* :class:`Offset` -- continues round numbering after a resume.
"""

from fedslim.strategies.compressed import Compressed
from fedslim.strategies.distill import Distilled, Distiller
from fedslim.strategies.fedavg import FedslimFedAvg
from fedslim.strategies.wrapper import Offset, StrategyWrapper

__all__ = ["Compressed", "Distilled", "Distiller", "FedslimFedAvg", "Offset", "StrategyWrapper"]
