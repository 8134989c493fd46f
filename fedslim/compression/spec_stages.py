"""The configs of the stages after selection -- low rank, values, entropy coding, zstd and
the small-tensor passthrough -- each a frozen dataclass declaring its properties. Part of
:mod:`fedslim.compression.spec` (which re-exports them and holds ``TopKConfig`` and the
``PipelineSpec`` that combines them).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedslim.compression.spec_base import (
    EXACT,
    Precision,
    Rounding,
    ScaleStat,
    StageProperties,
)
from fedslim.errors import SpecError

DEFAULT_PASSTHROUGH = 256
"""Tensors with fewer elements than this skip top-k and quantization (biases, norms)."""
DEFAULT_ZSTD_LEVEL = 3


@dataclass(frozen=True)
class LowRankConfig:
    """PowerSGD-style rank-``rank`` factors ``P Q^T`` of each matrix-shaped tensor."""

    rank: int

    def __post_init__(self) -> None:
        if not (1 <= self.rank <= 63):
            raise SpecError(f"lowrank rank must be an integer in 1..63, got {self.rank!r}")

    @property
    def properties(self) -> StageProperties:
        return StageProperties(False, False, False)  # a random start unless warm-started

    def __str__(self) -> str:
        return f"lowrank:{self.rank}"


@dataclass(frozen=True)
class QuantizeConfig:
    """Uniform ``bits``-bit quantization of values to ``2**bits`` levels spanning [-s, s].

    ``block`` = 0 uses one scale per tensor; otherwise one scale per ``block`` consecutive
    (kept) values, which bounds the damage one outlier does to its neighbours' resolution.
    """

    bits: int
    rounding: Rounding = Rounding.NEAREST
    block: int = 0
    scale: ScaleStat = ScaleStat.MAX

    def __post_init__(self) -> None:
        if not (1 <= self.bits <= 8):
            raise SpecError(f"q bits must be an integer in 1..8, got {self.bits!r}")
        if not (0 <= self.block <= 1 << 24):
            raise SpecError(f"q block must be 0 (per tensor) or in 1..{1 << 24}, got {self.block}")

    @property
    def properties(self) -> StageProperties:
        stochastic = self.rounding is Rounding.STOCHASTIC
        return StageProperties(False, stochastic, not stochastic)

    def __str__(self) -> str:
        parts = [str(self.bits)]
        if self.block:
            parts.append(f"block={self.block}")
        if self.rounding is not Rounding.NEAREST:
            parts.append(f"round={self.rounding.value}")
        if self.scale is not ScaleStat.MAX:
            parts.append(f"scale={self.scale.value}")
        return "q:" + ",".join(parts)


@dataclass(frozen=True)
class SignConfig:
    """1-bit sign times the mean magnitude of the block (signSGD / STC when after top-k)."""

    block: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.block <= 1 << 24):
            raise SpecError(f"sign block must be 0 (per tensor) or in 1..{1 << 24}, "
                            f"got {self.block}")

    @property
    def properties(self) -> StageProperties:
        return StageProperties(False, False, True)

    def __str__(self) -> str:
        return f"sign:block={self.block}" if self.block else "sign"


@dataclass(frozen=True)
class CastConfig:
    """The trivial quantizers: send values as fp32 (exact), fp16 or bf16."""

    precision: Precision = Precision.FP32

    @property
    def properties(self) -> StageProperties:
        if self.precision is Precision.FP32:
            return EXACT
        return StageProperties(False, False, True)

    def __str__(self) -> str:
        return self.precision.value


ValueConfig = QuantizeConfig | SignConfig | CastConfig


@dataclass(frozen=True)
class ZstdConfig:
    """General-purpose compression of each tensor's sections, kept only where it is smaller."""

    level: int = DEFAULT_ZSTD_LEVEL

    def __post_init__(self) -> None:
        if not (1 <= self.level <= 22):
            raise SpecError(f"zstd level must be in 1..22, got {self.level!r}")

    def __str__(self) -> str:
        return "zstd" if self.level == DEFAULT_ZSTD_LEVEL else f"zstd:{self.level}"


@dataclass(frozen=True)
class EntropyConfig:
    """rANS coding of quantized value codes under their histogram (the ``ans`` stage).

    Lossless: it changes how the codes are written, not what they are. A tensor keeps the
    bit-packed form where that is smaller (tiny tensors, near-uniform codes).
    """

    @property
    def properties(self) -> StageProperties:
        return EXACT

    def __str__(self) -> str:
        return "ans"


@dataclass(frozen=True)
class PassthroughConfig:
    """Tensors with fewer than ``below`` elements go as plain ``precision`` values."""

    below: int = DEFAULT_PASSTHROUGH
    precision: Precision = Precision.FP32

    def __post_init__(self) -> None:
        if not (0 <= self.below <= 1 << 31):
            raise SpecError(f"pass threshold must be in 0..{1 << 31}, got {self.below!r}")

    @property
    def is_default(self) -> bool:
        return self == PassthroughConfig()

    def __str__(self) -> str:
        if self.precision is Precision.FP32:
            return f"pass:{self.below}"
        return f"pass:{self.below},dtype={self.precision.value}"
