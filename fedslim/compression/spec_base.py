"""The building blocks of pipeline specs: the enums of stage options and the properties a
stage declares (kept apart from the stage configs in :mod:`fedslim.compression.spec`)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class SelectMode(Enum):
    """How top-k finds its threshold."""

    EXACT = "exact"  # exactly k kept; ties broken by lowest index
    SAMPLED = "sampled"  # DGC: threshold from a random sample; count within +-tol of k


class Scope(Enum):
    """Whether k is per tensor or shared by all (non-passthrough) tensors."""

    TENSOR = "tensor"
    GLOBAL = "global"


class Rounding(Enum):
    NEAREST = "nearest"  # deterministic; |error| <= half a quantization step
    STOCHASTIC = "stochastic"  # unbiased: E[decoded] == input


class ScaleStat(Enum):
    """Which statistic of a block sets the quantization range [-s, s]."""

    MAX = "max"  # s = max |v| (absmax, as NVFlare blockwise8)
    NORM = "norm"  # s = ||v||_2 (QSGD)


class Precision(Enum):
    """Plain floating-point formats used for casts and passthrough tensors."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class PositionCoding(Enum):
    """How the indices of kept values are written."""

    AUTO = "auto"  # per tensor, the cheaper of bitmap and golomb
    BITMAP = "bitmap"  # one bit per element
    GOLOMB = "golomb"  # Golomb-Rice code of the gaps between indices


@dataclass(frozen=True)
class StageProperties:
    """What a stage promises; a pipeline promises what all of its stages promise.

    Attributes
    ----------
    lossless : bool
        Decoding gives back the float32 input bit for bit.
    unbiased : bool
        Over the encoder's randomness, the expected decoded value equals the input.
    deterministic : bool
        Encoding the same input twice gives the same bytes (no randomness used).
    """

    lossless: bool
    unbiased: bool
    deterministic: bool

    def __and__(self, other: StageProperties) -> StageProperties:
        return StageProperties(
            lossless=self.lossless and other.lossless,
            unbiased=self.unbiased and other.unbiased,
            deterministic=self.deterministic and other.deterministic,
        )


EXACT = StageProperties(lossless=True, unbiased=True, deterministic=True)


def _fmt_float(x: float) -> str:
    # repr is the shortest string that round-trips, so printing then parsing is the identity.
    return repr(float(x))
