"""Flower strategies and strategy wrappers.

* :class:`Compressed` -- fedslim's update compression around ANY Flower strategy;
* :class:`Guarded` -- server-side defences against hostile or broken updates;
* :class:`Distilled` / :class:`Distiller` -- server-side distillation into a compact student;
* :class:`FedslimFedAvg` -- FedAvg with seeded sampling, float64 averaging, server optimizers;
* :class:`Offset` -- continues round numbering after a resume.

The names are imported on first use (PEP 562), so ``fedslim.strategies.registry`` -- which
``fedslim.config`` reads to check ``strategy=`` -- stays light and free of import cycles.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported eagerly
    from fedslim.strategies.compressed import Compressed as Compressed
    from fedslim.strategies.distill import Distilled as Distilled
    from fedslim.strategies.distill import Distiller as Distiller
    from fedslim.strategies.fedavg import FedslimFedAvg as FedslimFedAvg
    from fedslim.strategies.guard import Guarded as Guarded
    from fedslim.strategies.wrapper import Offset as Offset
    from fedslim.strategies.wrapper import StrategyWrapper as StrategyWrapper

_WHERE = {"Compressed": "compressed", "Distilled": "distill", "Distiller": "distill",
          "FedslimFedAvg": "fedavg", "Guarded": "guard", "Offset": "wrapper",
          "StrategyWrapper": "wrapper"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'fedslim.strategies' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedslim.strategies.{_WHERE[name]}"), name)
