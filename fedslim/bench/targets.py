"""Bytes-to-accuracy: comparing runs at equal bytes, not only at a fixed round count.

A run is a :class:`Curve` -- per round, central validation and test accuracy and the
cumulative bytes of every message both ways. Against a baseline run (plain FedAvg) of the
same seed:

* the **target** is a fraction (99%) of the baseline's final validation accuracy;
* :func:`first_reaching` gives the round and cumulative bytes at which a run first meets
  it (``None``: never), so ``bytes_to_target(baseline) / bytes_to_target(run)`` says how
  many times fewer bytes the run needed to get there;
* :func:`accuracy_within` gives the accuracy a run had when its cumulative bytes last fit
  a byte budget (``None``: even its first round did not fit) -- equal bytes, not equal
  rounds.

Pure functions on plain lists: unit-tested without a federation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TARGET_FRACTION = 0.99


@dataclass(frozen=True)
class Curve:
    """One run's per-round figures (index i = round i + 1)."""

    val: list[float]
    test: list[float]
    total_bytes: list[int]  # cumulative, every message both ways

    def __post_init__(self) -> None:
        if not len(self.val) == len(self.test) == len(self.total_bytes):
            raise ValueError("a curve needs as many val, test and byte figures")

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]]) -> Curve:
        """From bench rows ``{"val_accuracy", "test_accuracy", "total_bytes"}``."""
        return cls([r["val_accuracy"] for r in rows], [r["test_accuracy"] for r in rows],
                   [r["total_bytes"] for r in rows])


@dataclass(frozen=True)
class Reached:
    round: int
    total_bytes: int


def target_of(baseline: Curve, fraction: float = TARGET_FRACTION) -> float:
    """``fraction`` of the baseline's final validation accuracy."""
    if not baseline.val:
        raise ValueError("the baseline has no rounds")
    return fraction * baseline.val[-1]


def first_reaching(curve: Curve, target: float) -> Reached | None:
    """The first round whose validation accuracy is at least ``target``."""
    for i, acc in enumerate(curve.val):
        if acc >= target:
            return Reached(i + 1, curve.total_bytes[i])
    return None


def accuracy_within(curve: Curve, budget: float) -> tuple[int, float, float] | None:
    """(round, val, test) of the last round whose cumulative bytes are <= ``budget``."""
    last = None
    for i, spent in enumerate(curve.total_bytes):
        if spent > budget:
            break
        last = (i + 1, curve.val[i], curve.test[i])
    return last


def bytes_to_target_ratio(run: Curve, baseline: Curve,
                          fraction: float = TARGET_FRACTION) -> float | None:
    """How many times fewer bytes ``run`` needed than ``baseline`` to first reach the
    target (``None`` when the run never reached it)."""
    target = target_of(baseline, fraction)
    mine, theirs = first_reaching(run, target), first_reaching(baseline, target)
    if mine is None or theirs is None:
        return None
    return theirs.total_bytes / mine.total_bytes


__all__ = ["TARGET_FRACTION", "Curve", "Reached", "accuracy_within", "bytes_to_target_ratio",
           "first_reaching", "target_of"]
