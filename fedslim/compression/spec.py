"""Typed configuration of a compression pipeline and its canonical spec string.

A pipeline is a fixed sequence of optional *slots* -- selection (top-k, a byte budget, or
low-rank factors), value coding (quantize / sign / cast), position coding, entropy coding
(ans), lossless packing (zstd) and the small-tensor passthrough -- each filled by one frozen
config dataclass (their option enums live in :mod:`fedslim.compression.spec_base`).
Keeping the slots fixed (rather than an arbitrary list of stages) makes every spec mean
exactly one thing on the wire, gives each spec exactly one canonical string, and lets the
decoder check a payload against the spec it claims. The grammar that reads these strings
lives in :mod:`fedslim.compression.grammar`.

Each config declares its :class:`StageProperties`; :class:`PipelineSpec` combines them, so the
shared test suite can check exactly what each pipeline promises (lossless, unbiased, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from fedslim.compression.spec_base import (
    EXACT,
    PositionCoding,
    Precision,
    Rounding,
    ScaleStat,
    Scope,
    SelectMode,
    StageProperties,
    _fmt_float,
)
from fedslim.compression.spec_stages import (
    DEFAULT_PASSTHROUGH,
    DEFAULT_ZSTD_LEVEL,
    CastConfig,
    EntropyConfig,
    LowRankConfig,
    PassthroughConfig,
    QuantizeConfig,
    SignConfig,
    ValueConfig,
    ZstdConfig,
)
from fedslim.errors import SpecError

DEFAULT_SAMPLED_TOL = 0.1


def _fmt_ratio(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else _fmt_float(x)


@dataclass(frozen=True)
class TopKConfig:
    """Keep the largest-magnitude entries: a ``fraction`` in (0, 1], a fixed ``count``, as
    many as fit a byte budget (``budget`` bytes, or the update's float32 size over
    ``ratio``; a budget always selects globally, by magnitude across tensors), or the
    fewest that hold ``energy`` -- a fraction of the update's squared L2 norm -- per tensor
    (``scope=tensor``) or over the whole update (``scope=global``), where ``floor`` > 0 also
    keeps at least that fraction of every tensor's own energy."""

    fraction: float | None = None
    count: int | None = None
    mode: SelectMode = SelectMode.EXACT
    scope: Scope = Scope.TENSOR
    tol: float = DEFAULT_SAMPLED_TOL
    budget: int | None = None
    ratio: float | None = None
    energy: float | None = None
    floor: float = 0.0

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.fraction, self.count, self.budget, self.ratio,
                                         self.energy)]
        if sum(given) != 1:
            raise SpecError("topk needs exactly one of a fraction (e.g. 0.01 or 1%) or a "
                            "count (e.g. k=100); budget needs one of bytes or xRATIO; "
                            "energy needs a fraction")
        if self.energy is not None:
            if not (0.0 < self.energy <= 1.0):
                raise SpecError(f"energy must be a fraction in (0, 1], got {self.energy!r}")
            if self.mode is not SelectMode.EXACT:
                raise SpecError("energy selects exactly (no mode=sampled)")
            if not 0.0 <= self.floor <= self.energy:
                raise SpecError(f"energy floor must be in [0, {self.energy}] (the energy), "
                                f"got {self.floor!r}")
            if self.floor and self.scope is not Scope.GLOBAL:
                raise SpecError("an energy floor goes with scope=global (per tensor, the "
                                "energy itself is every tensor's floor)")
        elif self.floor:
            raise SpecError("floor is an option of energy: selections")
        if self.is_budget:
            if self.budget is not None and not (64 <= self.budget <= 1 << 40):
                raise SpecError(f"budget must be 64 B .. 1 TB, got {self.budget!r} bytes")
            if self.ratio is not None and not (1.0 <= self.ratio <= 1e9
                                               and math.isfinite(self.ratio)):
                raise SpecError(f"budget ratio must be in 1..1e9, got {self.ratio!r}")
            if self.scope is not Scope.GLOBAL:
                raise SpecError("a byte budget selects across tensors (scope=global)")
        if self.fraction is not None and not (0.0 < self.fraction <= 1.0):
            raise SpecError(f"topk fraction must be in (0, 1], got {self.fraction!r}")
        if self.count is not None and self.count < 1:
            raise SpecError(f"topk count must be >= 1, got {self.count!r}")
        if not (0.0 < self.tol < 1.0) or not math.isfinite(self.tol):
            raise SpecError(f"topk tol must be in (0, 1), got {self.tol!r}")
        if self.mode is SelectMode.EXACT and self.tol != DEFAULT_SAMPLED_TOL:
            raise SpecError("topk tol applies only to mode=sampled")

    @property
    def is_budget(self) -> bool:
        """True for ``budget:``: the encoder picks k so the payload fits the budget."""
        return self.budget is not None or self.ratio is not None

    @property
    def is_adaptive(self) -> bool:
        """True when the encoder picks k from the update itself (``budget:``, ``energy:``):
        the spec implies no count a receiver could check."""
        return self.is_budget or self.energy is not None

    def budget_for(self, numel: int) -> int:
        """The byte budget of an update of ``numel`` float32 values."""
        if self.budget is not None:
            return self.budget
        return max(1, math.floor(4 * numel / (self.ratio or 1.0)))

    def k_for(self, numel: int) -> int:
        """Number of entries to keep out of ``numel`` (at least one when numel > 0)."""
        if self.is_adaptive:
            raise SpecError(f"{self} has no fixed k: the encoder chooses it")
        if numel <= 0:
            return 0
        if self.count is not None:
            return min(self.count, numel)
        return min(numel, max(1, round((self.fraction or 0.0) * numel)))

    @property
    def is_dense(self) -> bool:
        return self.fraction == 1.0

    @property
    def properties(self) -> StageProperties:
        if self.is_dense:
            return EXACT
        return StageProperties(False, False, self.mode is SelectMode.EXACT)

    def __str__(self) -> str:
        if self.budget is not None:
            return f"budget:{self.budget}"
        if self.ratio is not None:
            return f"budget:x{_fmt_ratio(self.ratio)}"
        if self.energy is not None:
            return f"energy:{_fmt_float(self.energy)}" + (
                ",scope=global" if self.scope is Scope.GLOBAL else "") + (
                f",floor={_fmt_float(self.floor)}" if self.floor else "")
        amount = (f"k={self.count}" if self.count is not None
                  else _fmt_float(self.fraction or 0.0))
        parts = [amount]
        if self.mode is not SelectMode.EXACT:
            parts.append(f"mode={self.mode.value}")
        if self.scope is not Scope.TENSOR:
            parts.append(f"scope={self.scope.value}")
        if self.tol != DEFAULT_SAMPLED_TOL:
            parts.append(f"tol={_fmt_float(self.tol)}")
        return "topk:" + ",".join(parts)


@dataclass(frozen=True)
class PipelineSpec:
    """A whole compression pipeline; ``str(spec)`` is its canonical spec string.

    The default instance is the ``none`` pipeline: every tensor as plain float32.
    """

    topk: TopKConfig | None = None
    values: ValueConfig = field(default_factory=CastConfig)
    positions: PositionCoding = PositionCoding.AUTO
    zstd: ZstdConfig | None = None
    passthrough: PassthroughConfig = field(default_factory=PassthroughConfig)
    entropy: EntropyConfig | None = None
    lowrank: LowRankConfig | None = None

    def __post_init__(self) -> None:
        if self.positions is not PositionCoding.AUTO and self.topk is None:
            raise SpecError(
                f"position coding {self.positions.value!r} needs a 'topk' stage before it"
            )
        if self.entropy is not None and not isinstance(self.values, QuantizeConfig):
            raise SpecError("'ans' entropy-codes quantized values: it needs a 'q:B' stage "
                            "before it")

    # -- declared properties -------------------------------------------------------------
    @property
    def properties(self) -> StageProperties:
        props = self.values.properties
        if self.topk is not None:
            props = props & self.topk.properties
        if self.lowrank is not None:
            props = props & self.lowrank.properties
        if self.compresses and self.passthrough.below > 0:
            props = props & CastConfig(self.passthrough.precision).properties
        return props

    @property
    def compresses(self) -> bool:
        """True when some tensor would be sparsified or quantized (so passthrough matters)."""
        return (self.topk is not None or self.lowrank is not None
                or not isinstance(self.values, CastConfig))

    @property
    def is_identity(self) -> bool:
        """True when the pipeline sends plain float32 values (``none``, ``fp32``): the
        compression layer then leaves the message as stock Flower would send it."""
        return (not self.compresses and self.values == CastConfig() and self.zstd is None
                and self.entropy is None)

    @property
    def is_lossless(self) -> bool:
        """Decoding reproduces the float32 input bit for bit."""
        return self.properties.lossless

    @property
    def is_unbiased(self) -> bool:
        """E[decoded] == input over the encoder's randomness (no top-k, no biased rounding)."""
        return self.properties.unbiased

    @property
    def is_deterministic(self) -> bool:
        """Same input, same bytes. Decoding is always deterministic, whatever the spec."""
        return self.properties.deterministic

    # -- schedule -----------------------------------------------------------------------
    def at_round(self, server_round: int, warmup_rounds: int, start_density: float = 0.25
                 ) -> PipelineSpec:
        """The spec to use in ``server_round`` (1-based) under a DGC-style sparsity warm-up.

        Density decays exponentially from ``start_density`` in round 1 to the target
        fraction in round ``warmup_rounds + 1`` and stays there (DGC: 25%, 6.25%, 1.56%,
        0.39%, then 0.1%). Returns ``self`` when ``warmup_rounds == 0``, when there is no
        top-k stage, or when the target is already at least ``start_density``.

        Raises
        ------
        SpecError
            If the top-k stage keeps a fixed count (a count has no density to decay from),
            or the arguments are out of range.
        """
        if warmup_rounds < 0 or server_round < 1:
            raise SpecError(f"need server_round >= 1 and warmup_rounds >= 0, "
                            f"got {server_round} and {warmup_rounds}")
        if not (0.0 < start_density <= 1.0):
            raise SpecError(f"start_density must be in (0, 1], got {start_density!r}")
        if warmup_rounds == 0 or self.topk is None or self.topk.is_adaptive:
            return self  # (a budget or an energy is not a density: nothing to warm up)
        target = self.topk.fraction
        if target is None:
            raise SpecError(f"sparsity warm-up needs a fractional topk, not a count ({self.topk})")
        if server_round > warmup_rounds or target >= start_density:
            return self
        ratio = (server_round - 1) / warmup_rounds
        density = start_density * (target / start_density) ** ratio
        density = min(1.0, max(target, density))
        return replace(self, topk=replace(self.topk, fraction=density))

    def __str__(self) -> str:
        stages: list[str] = []
        if self.topk is not None:
            stages.append(str(self.topk))
        if self.lowrank is not None:
            stages.append(str(self.lowrank))
        if self.values != CastConfig():
            stages.append(str(self.values))
        if self.positions is not PositionCoding.AUTO:
            stages.append(self.positions.value)
        if self.entropy is not None:
            stages.append(str(self.entropy))
        if self.zstd is not None:
            stages.append(str(self.zstd))
        if not self.passthrough.is_default:
            stages.append(str(self.passthrough))
        return "|".join(stages) if stages else "none"


__all__ = ["DEFAULT_PASSTHROUGH", "DEFAULT_SAMPLED_TOL", "DEFAULT_ZSTD_LEVEL", "EXACT",
           "CastConfig", "EntropyConfig", "LowRankConfig", "PassthroughConfig", "PipelineSpec",
           "PositionCoding", "Precision", "QuantizeConfig", "Rounding", "ScaleStat", "Scope",
           "SelectMode", "SignConfig", "StageProperties", "TopKConfig", "ValueConfig",
           "ZstdConfig"]
