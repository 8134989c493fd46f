"""The server-side controller behind ``auto``: how much of each update's energy to keep.

One small part with one job: after every round it reads one loss signal and sets the
fraction ``E`` of each tensor's energy the next round's payloads keep (see
:class:`~fedslim.compression.auto.AutoSpec`). It works on the *dropped* fraction
``D = 1 - E``:

* **loosen on drift** -- the loss rose more than ``rise`` above the lowest of the last
  ``window`` rounds (or is not finite): ``D`` is halved (down to ``1 - high``). Compressed
  training that drifts away (a stale error-feedback residual, an adaptive server optimizer
  amplifying a sparse step) gets a faithful update at once, while it can still recover;
* **tighten on slack** -- after ``patience`` rounds in a row that improved the loss,
  ``D`` grows by ``grow`` (up to ``1 - low``): compression creeps back to, and past, the
  base level while training goes well.

The signal is deterministic per seed (a loss the server computes or receives), so the
level sequence -- and the model -- are too. State is a handful of numbers, checkpointed
with the strategy (:meth:`state_dict`), so a resumed run continues bit for bit.

Which loss: the first available of the server's own evaluation (a validation loss where
there is one), the federated evaluation's aggregated loss, the clients' aggregated train
loss -- chosen once, in the first round that has one, and kept for the run
(:func:`pick_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedslim.compression.auto import AutoSpec
from fedslim.compression.spec import PipelineSpec

GRID = 1000  # energies are kept on a 1/1000 grid: short, canonical spec strings


@dataclass(frozen=True)
class ControlConfig:
    """How fast the level moves (the defaults were chosen on the digits CNN's validation
    split; see docs/compression.md)."""

    rise: float = 0.05
    window: int = 3
    patience: int = 2
    grow: float = 1.25

    def __post_init__(self) -> None:
        if not (self.rise > 0 and self.window >= 1 and self.patience >= 1
                and self.grow >= 1.0):
            raise ValueError(f"invalid controller settings {self}")


class EnergyController:
    """The energy level of one direction (uplink or downlink) of one run."""

    def __init__(self, auto: AutoSpec, config: ControlConfig | None = None) -> None:
        self.auto = auto
        self.config = config or ControlConfig()
        self.dropped = 1.0 - auto.energy
        self.losses: list[float] = []
        self.streak = 0

    @property
    def energy(self) -> float:
        return round((1.0 - self.dropped) * GRID) / GRID

    @property
    def spec(self) -> PipelineSpec:
        """The pipeline for the next round."""
        return self.auto.at(self.energy)

    def observe(self, loss: float | None) -> None:
        """Take the last round's loss (None: no signal this round, nothing changes)."""
        if loss is None:
            return
        cfg = self.config
        floor, ceiling = 1.0 - self.auto.high, 1.0 - self.auto.low
        recent = self.losses[-cfg.window:]
        if not math.isfinite(loss) or (recent and loss > min(recent) * (1.0 + cfg.rise)):
            self.dropped = max(floor, self.dropped / 2.0)
            self.streak = 0
        elif recent and loss < recent[-1]:
            self.streak += 1
            if self.streak >= cfg.patience:
                self.dropped = min(ceiling, self.dropped * cfg.grow)
                self.streak = 0
        if math.isfinite(loss):
            self.losses = (self.losses + [loss])[-cfg.window:]

    # -- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"dropped": torch.tensor([self.dropped], dtype=torch.float64),
                "streak": torch.tensor([self.streak], dtype=torch.int64),
                "losses": torch.tensor(self.losses, dtype=torch.float64)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if "dropped" in state:
            self.dropped = float(state["dropped"].item())
            self.streak = int(state["streak"].item())
            self.losses = [float(x) for x in state["losses"].tolist()]


# -- which loss ------------------------------------------------------------------------------
SOURCES = ("central", "federated", "train")


def loss_key(metrics: Mapping[str, float]) -> str | None:
    """The loss among ``metrics``: a key naming a loss, a validation one first."""
    keys = sorted(k for k in metrics if "loss" in k.lower())
    val = [k for k in keys if "val" in k.lower()]
    found = val or keys
    return found[0] if found else None


def pick_loss(signals: Mapping[str, Mapping[str, float]], chosen: tuple[str, str] | None
              ) -> tuple[float | None, tuple[str, str] | None]:
    """The round's loss from ``signals`` (source -> finite scalar metrics) and the (source,
    key) it came from: ``chosen`` if given (a source that went missing gives None), else
    the first source of :data:`SOURCES` with a loss."""
    if chosen is not None:
        source, key = chosen
        value = signals.get(source, {}).get(key)
        return (float(value) if value is not None else None), chosen
    for source in SOURCES:
        metrics = signals.get(source, {})
        found = loss_key(metrics)
        if found is not None:
            return float(metrics[found]), (source, found)
    return None, None


__all__ = ["ControlConfig", "EnergyController", "loss_key", "pick_loss"]
