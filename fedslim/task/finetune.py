"""What a client trains when fine-tuning (``trainable``): all, the head, a schedule, LoRA.

* ``all``          -- every parameter (plain federated training);
* ``head``         -- only the last layer (the classifier); the rest is frozen;
* ``schedule:N``   -- layer-wise unfreezing from the top: in rounds 1..N the last layer,
  in N+1..2N the last two, and so on, until everything trains;
* ``lora:R``       -- every weight with ``ndim >= 2`` trains as ``W0 + B @ A`` with rank-R
  factors (``B`` starts at zero, ``A`` seeded per client and round) while ``W0`` is
  frozen; biases train. After local training the factors are merged, so the update of
  each weight has rank <= R (an uplink ``lowrank:R`` stage sends exactly those factors).

A frozen parameter's update is exactly zero: a compressing uplink spends a few header
bytes on it, nothing more. The model keeps its names and shapes, so ``init-from``,
export, resume and every strategy work unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from fedslim.errors import ConfigError

_SPEC = re.compile(r"^(all|head|schedule:([1-9][0-9]*)|lora:([1-9][0-9]*))$")


@dataclass(frozen=True)
class Trainable:
    kind: str          # all | head | schedule | lora
    every: int = 0     # schedule: rounds per unfrozen layer
    rank: int = 0      # lora: rank of the factors

    def __str__(self) -> str:
        return {"schedule": f"schedule:{self.every}", "lora": f"lora:{self.rank}"}.get(
            self.kind, self.kind)


def parse_trainable(text: str) -> Trainable:
    """``all`` | ``head`` | ``schedule:N`` | ``lora:R``, or one ConfigError line."""
    match = _SPEC.match(text.strip())
    if match is None:
        raise ConfigError(f"run-config key 'trainable': {text!r}; accepted: all, head, "
                          "schedule:N (unfreeze one more layer every N rounds), lora:R")
    kind = match.group(1).split(":")[0]
    return Trainable(kind, every=int(match.group(2) or 0), rank=int(match.group(3) or 0))


def layers(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped by the module that owns them, in registration order
    (modules without parameters left out): the "layers" a schedule unfreezes."""
    groups = []
    for prefix, module in model.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
        if own:
            groups.append(own)
    return groups


def trained_names(model: nn.Module, spec: Trainable, server_round: int) -> set[str]:
    """The parameters a client trains in ``server_round`` (all of them for lora: the
    factors replace the weights' own training)."""
    groups = layers(model)
    if spec.kind in ("all", "lora"):
        return {n for g in groups for n in g}
    top = 1 if spec.kind == "head" else math.ceil(max(server_round, 1) / spec.every)
    return {n for g in groups[-top:] for n in g}


class _LowRankDelta(nn.Module):
    """``W -> W + (B @ A).reshape(W.shape)``: a LoRA parametrization of one weight."""

    def __init__(self, weight: torch.Tensor, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        rows, cols = weight.shape[0], weight[0].numel()
        r = min(rank, rows, cols)
        a = torch.randn(r, cols, generator=generator) / math.sqrt(cols)
        self.A = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))
        self.B = nn.Parameter(torch.zeros(rows, r, device=weight.device, dtype=weight.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.B @ self.A).reshape(w.shape)


@contextmanager
def training_scope(model: nn.Module, spec: Trainable, server_round: int,
                   seed_parts: tuple[int, ...] = ()) -> Iterator[None]:
    """Freeze (or factor, for lora) what ``spec`` says for the duration of the block; on
    exit every parameter trains again and lora's factors are merged into the weights."""
    if spec.kind == "all":
        yield
        return
    frozen = []
    keep = trained_names(model, spec, server_round)
    factored: list[nn.Module] = []
    if spec.kind == "lora":
        gen = torch.Generator().manual_seed(hash((*seed_parts, server_round)) % (2 ** 63))
        for module in list(model.modules()):
            w = getattr(module, "weight", None)
            if isinstance(w, nn.Parameter) and w.ndim >= 2 and w.is_floating_point():
                parametrize.register_parametrization(
                    module, "weight", _LowRankDelta(w.detach(), spec.rank, gen))
                factored.append(module)
        for name, p in model.named_parameters():
            if name.endswith("parametrizations.weight.original"):
                p.requires_grad_(False)
                frozen.append(p)
    else:
        for name, p in model.named_parameters():
            if name not in keep and p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)
    try:
        yield
    finally:
        for module in factored:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        for p in model.parameters():
            p.requires_grad_(True)
