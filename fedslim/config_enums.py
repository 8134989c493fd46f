"""The closed choices of the run configuration (re-exported by ``fedslim.config``)."""

from __future__ import annotations

import enum


class Normalize(enum.StrEnum):
    NONE = "none"
    STANDARDIZE = "standardize"   # per feature, with the clients' (training) statistics


class Layout(enum.StrEnum):
    AS_IS = "as-is"
    CHANNELS_LAST = "channels-last"   # move the last axis to position 1


class Optimizer(enum.StrEnum):
    SGD = "sgd"
    ADAM = "adam"


class DevicePref(enum.StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class ServerOpt(enum.StrEnum):
    AVG = "avg"      # w += server-lr * mean update (FedAvg when server-lr = 1)
    AVGM = "avgm"    # server momentum (FedAvgM)
    ADAM = "adam"    # FedAdam


class ErrorFeedbackMode(enum.StrEnum):
    """``error-feedback``: ``auto`` = on with full participation (``fraction-train=1``),
    off with partial participation, where a client's residual is rarely sent and stale when
    it is (measured: docs/scaling.md), but still costs a model-sized file per client."""

    AUTO = "auto"
    ON = "true"
    OFF = "false"

    def enabled(self, fraction_train: float) -> bool:
        return self is ErrorFeedbackMode.ON or (
            self is ErrorFeedbackMode.AUTO and fraction_train >= 1.0)


class Teacher(enum.StrEnum):
    ENSEMBLE = "ensemble"  # mean logits of the participating clients' models
    GLOBAL = "global"      # the aggregated global model
    BOTH = "both"          # mean of the two


class Augment(enum.StrEnum):
    NONE = "none"
    NOISE = "noise"
    SHIFT = "shift"
    NOISE_SHIFT = "noise+shift"
