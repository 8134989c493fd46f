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
    """``error-feedback``: ``auto`` = on when at least 10% of the clients train each round,
    off below. Measured (docs/scaling.md, 3 seeds each): it helps at full participation
    (+2.4 pp) and at 10% (+3.0 pp); at 1% it changes nothing beyond the seeds' spread (a
    client returns after ~100 rounds, its residual stale) but still costs a model-sized
    residual file per client."""

    AUTO = "auto"
    ON = "true"
    OFF = "false"

    def enabled(self, fraction_train: float) -> bool:
        return self is ErrorFeedbackMode.ON or (
            self is ErrorFeedbackMode.AUTO and fraction_train >= AUTO_EF_MIN_FRACTION)


AUTO_EF_MIN_FRACTION = 0.1  # the lowest participation at which EF was measured to help


class Teacher(enum.StrEnum):
    ENSEMBLE = "ensemble"  # mean logits of the participating clients' models
    GLOBAL = "global"      # the aggregated global model
    BOTH = "both"          # mean of the two


class Augment(enum.StrEnum):
    NONE = "none"
    NOISE = "noise"
    SHIFT = "shift"
    NOISE_SHIFT = "noise+shift"
