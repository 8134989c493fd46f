"""Aggregation as pure functions (no Flower): validation, weighted mean, server optimizers.

Everything here works on ``dict[str, torch.Tensor]`` so it is unit-tested against a float64
reference without a federation. Updates are *deltas* (client weights minus the global
weights the client started from); the server optimizer turns their weighted mean into the
step applied to the global model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fedslim.compression.buffers import all_finite
from fedslim.config import ServerOpt
from fedslim.errors import UpdateRejected

State = dict[str, torch.Tensor]


def float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of floating-point entries: the ones that are averaged and compressed.

    Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) stay the server's own.
    """
    return [k for k, v in state.items() if v.is_floating_point()]


def validate_update(update: Mapping[str, torch.Tensor],
                    expected: Mapping[str, tuple[int, ...]], who: str) -> None:
    """Reject an update whose names, shapes or values are not what the model needs."""
    missing = sorted(set(expected) - set(update))
    extra = sorted(set(update) - set(expected))
    if missing or extra:
        raise UpdateRejected(f"{who}: tensor names differ from the model's "
                             f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for name, shape in expected.items():
        t = update[name]
        if tuple(t.shape) != tuple(shape):
            raise UpdateRejected(f"{who}: tensor {name!r} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(shape)}")
        if not t.is_floating_point():
            raise UpdateRejected(f"{who}: tensor {name!r} has dtype {t.dtype}, expected float")
        if not all_finite(t):
            raise UpdateRejected(f"{who}: tensor {name!r} holds NaN or Inf")


def metric_scalar(metrics: Mapping[str, object], key: str, who: str) -> float:
    """A client-reported metric as a finite float; lists, bools and NaN are rejected."""
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UpdateRejected(f"{who}: metric {key!r} is {value!r}, expected a number")
    if not math.isfinite(float(value)):
        raise UpdateRejected(f"{who}: metric {key!r} is {value}, expected a finite number")
    return float(value)


def validate_weight(weight: object, who: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise UpdateRejected(f"{who}: num-examples is {weight!r}, expected a number")
    w = float(weight)
    if not math.isfinite(w) or w <= 0:
        raise UpdateRejected(f"{who}: num-examples is {w}, expected a positive finite number")
    return w


def weighted_mean(updates: Sequence[Mapping[str, torch.Tensor]],
                  weights: Sequence[float]) -> State:
    """Example-weighted mean of updates, accumulated in float64, returned as float32."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"need as many weights as updates (got {len(updates)} updates, "
                         f"{len(weights)} weights)")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out: State = {}
    for name in updates[0]:
        acc = torch.zeros(updates[0][name].shape, dtype=torch.float64)
        for upd, w in zip(updates, weights, strict=True):
            acc.add_(upd[name].to("cpu", torch.float64), alpha=w / total)
        out[name] = acc.to(torch.float32)
    return out


class ServerOptimizer:
    """Turns the mean client update into the global step: FedAvg, FedAvgM or FedAdam.

    ``avg``: step = lr * mean. ``avgm``: v = beta * v + mean; step = lr * v (Hsu et al.
    2019). ``adam``: Adam moments on the mean update as a pseudo-gradient (Reddi et al.
    2021, FedAdam with tau = 1e-3 as its adaptivity floor).
    """

    def __init__(self, kind: ServerOpt, lr: float, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        self.kind, self.lr, self.beta1, self.beta2, self.tau = kind, lr, beta1, beta2, tau
        self.m: State = {}
        self.v: State = {}
        self.t = 0

    def step(self, mean_update: Mapping[str, torch.Tensor]) -> State:
        self.t += 1
        if self.kind is ServerOpt.AVG:
            return {k: self.lr * u for k, u in mean_update.items()}
        if self.kind is ServerOpt.AVGM:
            for k, u in mean_update.items():
                self.m[k] = self.beta1 * self.m[k] + u if k in self.m else u.clone()
            return {k: self.lr * self.m[k] for k in mean_update}
        out: State = {}
        for k, u in mean_update.items():
            m = self.m.get(k, torch.zeros_like(u))
            v = self.v.get(k, torch.zeros_like(u))
            m = self.beta1 * m + (1 - self.beta1) * u
            v = self.beta2 * v + (1 - self.beta2) * u * u
            self.m[k], self.v[k] = m, v
            out[k] = self.lr * m / (v.sqrt() + self.tau)
        return out

    def state_dict(self) -> State:
        state = {f"m/{k}": v for k, v in self.m.items()}
        state.update({f"v/{k}": v for k, v in self.v.items()})
        state["t"] = torch.tensor([self.t], dtype=torch.int64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.m = {k[2:]: v.clone() for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: v.clone() for k, v in state.items() if k.startswith("v/")}
        self.t = int(state["t"].item()) if "t" in state else 0


def apply_step(global_state: Mapping[str, torch.Tensor],
               step: Mapping[str, torch.Tensor]) -> State:
    """New global state: float entries plus the step, others unchanged."""
    return {k: (v + step[k].to(v.dtype) if k in step else v.clone())
            for k, v in global_state.items()}
