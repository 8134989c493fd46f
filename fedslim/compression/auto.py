"""``auto``: a compression level that follows the update, not a fixed spec.

``uplink=auto`` / ``downlink=auto`` stand for the family ``energy:E|q:B|ans|pass:0``:
every tensor keeps the fewest largest values that hold a fraction ``E`` of its energy
(:mod:`fedslim.compression.fidelity`), 4-bit quantized and entropy-coded, biases included.
How many values that is -- hence the bytes -- is measured on each update, so a model whose
updates are concentrated is compressed far more than one whose updates are spread out, and
no layer is starved by a larger one. ``E`` itself is set each round by a controller on the
server (:mod:`fedslim.strategies.control`) from the base value here.

:class:`AutoSpec` is pure configuration (no state); ``str(AutoSpec())`` is ``auto``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

from fedslim.compression.spec import (
    EntropyConfig,
    PassthroughConfig,
    PipelineSpec,
    QuantizeConfig,
    Scope,
    TopKConfig,
    _fmt_float,
)
from fedslim.errors import SpecError

AUTO = "auto"


@dataclass(frozen=True)
class AutoSpec:
    """Configuration of an adaptive pipeline.

    Attributes
    ----------
    energy : float
        Base fraction of each tensor's energy (squared L2 norm) the payload keeps.
    low, high : float
        The range the controller may move ``energy`` in.
    bits : int
        Quantizer bit width of the kept values.
    """

    energy: float = 0.5
    low: float = 0.2
    high: float = 0.95
    bits: int = 4

    def __post_init__(self) -> None:
        if not 0.0 < self.low <= self.energy <= self.high <= 1.0:
            raise SpecError(f"auto needs 0 < low <= energy <= high <= 1, got low={self.low}, "
                            f"energy={self.energy}, high={self.high}")
        if not 1 <= self.bits <= 8:
            raise SpecError(f"auto bits must be in 1..8, got {self.bits}")

    def at(self, energy: float) -> PipelineSpec:
        """The concrete pipeline keeping ``energy`` (clamped to [low, high])."""
        kept = min(self.high, max(self.low, energy))
        return PipelineSpec(topk=TopKConfig(energy=kept, scope=Scope.TENSOR),
                            values=QuantizeConfig(self.bits), entropy=EntropyConfig(),
                            passthrough=PassthroughConfig(below=0))

    def __str__(self) -> str:
        changed = [f"{f.name}={_fmt_number(getattr(self, f.name))}" for f in fields(self)
                   if getattr(self, f.name) != f.default]
        return AUTO + (":" + ",".join(changed) if changed else "")


UPLINK_AUTO = AutoSpec()
"""``uplink=auto``."""
DOWNLINK_AUTO = AutoSpec(energy=0.5)
"""``downlink=auto`` with a compressing uplink (with ``uplink=none`` it is ``none``)."""


def compresses(pipeline: PipelineSpec | AutoSpec) -> bool:
    """Whether messages through ``pipeline`` differ from plain float32 arrays."""
    return isinstance(pipeline, AutoSpec) or not pipeline.is_identity


def _fmt_number(value: float) -> str:
    return str(value) if isinstance(value, int) else _fmt_float(value)


_OPTION = re.compile(r"^(energy|low|high|bits)=([0-9.eE+-]+)$")


def parse_auto(text: str) -> AutoSpec | None:
    """``auto`` or ``auto:energy=0.6,bits=4,...`` -> :class:`AutoSpec`; None for any other
    text (a concrete spec).

    Raises
    ------
    SpecError
        For an ``auto:`` with an unknown option or a value out of range.
    """
    head, colon, rest = text.strip().partition(":")
    if head.strip() != AUTO:
        return None
    values: dict[str, float | int] = {}
    for item in (rest.split(",") if colon else []):
        match = _OPTION.match(item.strip())
        if match is None:
            raise SpecError(f"invalid auto option {item.strip()!r} in {text!r}; accepted: "
                            "energy=F, low=F, high=F (fractions), bits=N")
        name, raw = match.groups()
        try:
            values[name] = int(raw) if name == "bits" else float(raw)
        except ValueError:
            raise SpecError(f"auto option {name} must be a number, got {raw!r}") from None
    return AutoSpec(**values)  # type: ignore[arg-type]


__all__ = ["AUTO", "DOWNLINK_AUTO", "UPLINK_AUTO", "AutoSpec", "compresses", "parse_auto"]
