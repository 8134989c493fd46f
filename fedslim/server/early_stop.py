"""Early stopping of the federation on the server's validation split.

Flower 1.41's ``Strategy.start`` runs a fixed number of rounds (1.43 adds ``should_stop``);
fedslim stops it from the central evaluation, the last step of each round: when the round
that just ended makes ``patience`` rounds without a validation-accuracy gain above
``min_delta``, :meth:`EarlyStop.observe` says so and the ServerApp ends the loop (the
round is recorded and checkpointed first). Every improvement's model is written to
``best-model.safetensors``, so the best round survives a stop, a crash or a resume; its
round and accuracies go into ``results.json`` (``final.best``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fedslim.report import BestRound, RoundReport
from fedslim.server.storage import save_model

BEST_MODEL_FILE = "best-model.safetensors"


class StopFederation(Exception):  # noqa: N818 -- a signal, not an error
    """Raised out of the central evaluation to end ``Strategy.start`` after this round."""


def best_round(history: list[RoundReport], min_delta: float = 0.0) -> tuple[BestRound | None,
                                                                             int]:
    """The best round by validation accuracy (a later one only counts when it gains more
    than ``min_delta``) and how many rounds have passed since it."""
    best: BestRound | None = None
    since = 0
    for r in sorted(history, key=lambda h: h.round):
        if r.central is None:
            since += 1
            continue
        val = r.central.val.accuracy
        if best is None or val > best.val_accuracy + min_delta:
            best, since = BestRound(r.round, val, r.central.test.accuracy), 0
        else:
            since += 1
    return best, since


@dataclass
class EarlyStop:
    patience: int
    min_delta: float
    outdir: Path

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def observe(self, history: list[RoundReport], model: torch.nn.Module,
                metadata: dict[str, str]) -> str | None:
        """After a round: keep its model if it is the new best; the reason to stop, if any."""
        best, since = best_round(history, self.min_delta)
        if not self.enabled or best is None:
            return None
        if since == 0:
            save_model(self.outdir / BEST_MODEL_FILE,
                       {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                       {**metadata, "round": str(best.round)})
        if since >= self.patience:
            return (f"no validation-accuracy gain above {self.min_delta:g} for {since} "
                    f"rounds after round {best.round}")
        return None

    def final(self, history: list[RoundReport]) -> BestRound | None:
        """The best round for ``results.json``, with its model file when it was kept."""
        best, _ = best_round(history, self.min_delta)
        if best is not None and self.enabled and (self.outdir / BEST_MODEL_FILE).exists():
            best.model_file = BEST_MODEL_FILE
        return best
