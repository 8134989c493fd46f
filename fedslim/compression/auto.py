"""``auto``: a compression level that follows the update, not a fixed share of values.

``uplink=auto`` / ``downlink=auto`` are the pipeline ``energy:E|q:B|ans|pass:0``: every
tensor keeps the fewest largest values that hold a fraction ``E`` of its energy (its
squared L2 norm; :mod:`fedslim.compression.fidelity`), quantized to ``B`` bits and
entropy-coded, biases included. How many values that is -- hence the bytes -- is measured
on each update, per tensor: a model whose updates are concentrated is compressed far more
than one whose updates are spread out, a layer whose updates are small next to the others'
still moves every round, and a dense step (an adaptive server optimizer's) is sent densely.
The level ``E`` and the bits were chosen on the digits CNN's validation split (see
docs/compression.md) and are the same for every model.

:class:`AutoSpec` is pure configuration; ``str(AutoSpec())`` is ``auto``.
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
AUTO_ENERGY = 0.4
AUTO_BITS = 2


@dataclass(frozen=True)
class AutoSpec:
    """The adaptive pipeline's settings.

    Attributes
    ----------
    energy : float
        Fraction of each tensor's energy (squared L2 norm) a payload keeps.
    bits : int
        Quantizer bit width of the kept values.
    """

    energy: float = AUTO_ENERGY
    bits: int = AUTO_BITS

    def __post_init__(self) -> None:
        if not 0.0 < self.energy <= 1.0:
            raise SpecError(f"auto energy must be a fraction in (0, 1], got {self.energy}")
        if not 1 <= self.bits <= 8:
            raise SpecError(f"auto bits must be in 1..8, got {self.bits}")

    @property
    def spec(self) -> PipelineSpec:
        """The concrete pipeline."""
        return PipelineSpec(topk=TopKConfig(energy=self.energy, scope=Scope.TENSOR),
                            values=QuantizeConfig(self.bits), entropy=EntropyConfig(),
                            passthrough=PassthroughConfig(below=0))

    def __str__(self) -> str:
        changed = [f"{f.name}={_fmt_number(getattr(self, f.name))}" for f in fields(self)
                   if getattr(self, f.name) != f.default]
        return AUTO + (":" + ",".join(changed) if changed else "")


UPLINK_AUTO = AutoSpec()
"""``uplink=auto``."""
DOWNLINK_AUTO = AutoSpec()
"""``downlink=auto`` with a compressing uplink (with ``uplink=none`` it is ``none``)."""


def compresses(pipeline: PipelineSpec | AutoSpec) -> bool:
    """Whether messages through ``pipeline`` differ from plain float32 arrays."""
    return isinstance(pipeline, AutoSpec) or not pipeline.is_identity


def resolve(pipeline: PipelineSpec | AutoSpec) -> PipelineSpec:
    """The concrete pipeline behind ``pipeline``."""
    return pipeline.spec if isinstance(pipeline, AutoSpec) else pipeline


def _fmt_number(value: float) -> str:
    return str(value) if isinstance(value, int) else _fmt_float(value)


_OPTION = re.compile(r"^(energy|bits)=([0-9.eE+-]+)$")


def parse_auto(text: str) -> AutoSpec | None:
    """``auto`` or ``auto:energy=0.6,bits=4`` -> :class:`AutoSpec`; None for any other text
    (a concrete spec).

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
                            "energy=F (a fraction), bits=N")
        name, raw = match.groups()
        try:
            values[name] = int(raw) if name == "bits" else float(raw)
        except ValueError:
            raise SpecError(f"auto option {name} must be a number, got {raw!r}") from None
    return AutoSpec(**values)  # type: ignore[arg-type]


__all__ = ["AUTO", "DOWNLINK_AUTO", "UPLINK_AUTO", "AutoSpec", "compresses", "parse_auto",
           "resolve"]
