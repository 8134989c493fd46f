"""Magnitude pruning of a trained model and a file format that stores only what is kept.

Pruning (per layer, every float weight with ``ndim >= 2`` except the classifier -- the
last one -- whose rows are the classes):

* ``unstructured``: the ``sparsity`` share of each weight's smallest-magnitude entries is
  set to zero;
* ``structured``: the ``sparsity`` share of each weight's output channels (rows: conv
  filters, linear neurons) with the smallest L2 norm is set to zero, with their biases.

The file (:func:`pack` / :func:`unpack`, a safetensors dict) keeps, for a pruned weight,
only the kept values (float32, or int8 with one scale per output channel: see
:mod:`fedslim.task.ptq`) and which entries they are: one bit per entry (unstructured) or
per row (structured), packed. Unpruned weights are stored as :mod:`fedslim.task.ptq`
does; biases and norm parameters stay float32. ``unpack`` checks every count against the
shape it claims before allocating.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from fedslim.errors import ConfigError, DecodeError
from fedslim.task.ptq import SCALE_SUFFIX, dequantize_state_int8, quantize_state_int8

State = dict[str, torch.Tensor]
MASK, ROWS, VALUES, SCALE = ".__mask__", ".__rows__", ".__values__", ".__vscale__"
META_KEY = "fedslim-pruned"
MAX_ELEMENTS = 1 << 31  # no state a file claims may exceed this (allocation bound)


def prunable(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Float weights with ``ndim >= 2``, in order, without the last one (the classifier)."""
    names = [k for k, v in state.items() if v.is_floating_point() and v.ndim >= 2]
    return names[:-1]


def masks(state: Mapping[str, torch.Tensor], sparsity: float, structured: bool
          ) -> dict[str, torch.Tensor]:
    """Per prunable weight, the boolean mask of entries kept (True) at ``sparsity``."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    out: dict[str, torch.Tensor] = {}
    for name in prunable(state):
        w = state[name].detach().float()
        if structured:
            norms = w.flatten(1).norm(dim=1)
            drop = math.floor(sparsity * len(norms))
            keep_rows = torch.ones(len(norms), dtype=torch.bool)
            if drop:
                keep_rows[torch.argsort(norms, stable=True)[:drop]] = False
            out[name] = keep_rows[:, None].expand(len(norms), w[0].numel()).reshape(w.shape)
        else:
            drop = math.floor(sparsity * w.numel())
            keep = torch.ones(w.numel(), dtype=torch.bool)
            if drop:
                keep[torch.argsort(w.abs().flatten(), stable=True)[:drop]] = False
            out[name] = keep.reshape(w.shape)
    return out


def apply(state: Mapping[str, torch.Tensor], kept: Mapping[str, torch.Tensor],
          structured: bool) -> State:
    """``state`` with the pruned entries zeroed (and, structured, the pruned rows' biases)."""
    out = {k: v.detach().clone() for k, v in state.items()}
    for name, m in kept.items():
        out[name] = torch.where(m, out[name], torch.zeros((), dtype=out[name].dtype))
        bias = name[: -len("weight")] + "bias" if name.endswith("weight") else None
        if structured and bias in out and out[bias].shape == (m.shape[0],):
            out[bias] = torch.where(m.flatten(1).any(1), out[bias],
                                    torch.zeros((), dtype=out[bias].dtype))
    return out


def sparsity_of(state: Mapping[str, torch.Tensor]) -> float:
    """Share of exact zeros over the prunable weights."""
    names = prunable(state)
    total = sum(state[k].numel() for k in names)
    return sum(int((state[k] == 0).sum()) for k in names) / total if total else 0.0


def _bits(m: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(m.flatten().numpy().astype(np.uint8)))


def pack(state: Mapping[str, torch.Tensor], kept: Mapping[str, torch.Tensor],
         structured: bool, int8: bool) -> tuple[State, dict[str, str]]:
    """The file's tensors and metadata for a pruned ``state`` (zeros where not kept)."""
    rest = {k: v for k, v in state.items() if k not in kept}
    out: State = quantize_state_int8(rest) if int8 else {
        k: (v.float() if v.is_floating_point() else v).contiguous().clone()
        for k, v in rest.items()}
    shapes: dict[str, list[int]] = {}
    for name, m in kept.items():
        w = state[name].detach().float().flatten(1)
        m2 = m.flatten(1)
        shapes[name] = list(state[name].shape)
        if structured:
            out[name + ROWS] = _bits(m2.any(1))
        else:
            out[name + MASK] = _bits(m2)
        values = w
        if int8:  # ptq's per-output-channel int8, its scales over the kept entries only
            q = quantize_state_int8({name: w * m2})
            values, out[name + SCALE] = q[name], q[name + SCALE_SUFFIX]
        out[name + VALUES] = values[m2].contiguous().clone()  # row-major, kept only
    meta = {META_KEY: json.dumps({"structured": structured, "int8": int8, "shapes": shapes})}
    return out, meta


def _unbits(bits: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if bits.dtype != torch.uint8 or bits.ndim != 1 or len(bits) != (n + 7) // 8:
        raise DecodeError(f"{what}: expected {(n + 7) // 8} packed bytes, got "
                          f"{bits.dtype} {list(bits.shape)}")
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n).astype(bool))


def unpack(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> State:
    """A dense float32 state from :func:`pack`'s output (a plain or int8 file too).

    Raises
    ------
    DecodeError
        If the metadata, a mask, a value count or a scale does not fit the shapes.
    """
    raw = (metadata or {}).get(META_KEY)
    if raw is None:
        return dequantize_state_int8(tensors)
    try:
        info = json.loads(raw)
        structured, shapes = bool(info["structured"]), dict(info["shapes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DecodeError(f"bad {META_KEY} metadata: {exc}") from None
    suffixes = (MASK, ROWS, VALUES, SCALE)
    out = dequantize_state_int8({k: v for k, v in tensors.items()
                                 if not k.endswith(suffixes)})
    for name, shape in shapes.items():
        if not (isinstance(shape, list) and len(shape) >= 2
                and all(isinstance(d, int) and d > 0 for d in shape)
                and math.prod(shape) <= MAX_ELEMENTS):
            raise DecodeError(f"{name!r}: bad shape {shape!r}")
        n_rows, row = shape[0], math.prod(shape[1:])
        if structured:
            rows = _unbits(tensors.get(name + ROWS, torch.empty(0)), n_rows, f"{name} rows")
            m = rows[:, None].expand(n_rows, row)
        else:
            m = _unbits(tensors.get(name + MASK, torch.empty(0)), n_rows * row,
                        f"{name} mask").reshape(n_rows, row)
        values = tensors.get(name + VALUES)
        if values is None or values.ndim != 1 or len(values) != int(m.sum()):
            raise DecodeError(f"{name!r}: expected {int(m.sum())} kept values")
        values = values.float()
        scale = tensors.get(name + SCALE)
        if scale is not None:
            if tuple(scale.shape) != (n_rows,) or not bool(torch.isfinite(scale).all()) \
                    or not bool((scale > 0).all()):
                raise DecodeError(f"{name!r}: bad scale")
            values = values * scale[:, None].expand(n_rows, row)[m]
        dense = torch.zeros(n_rows, row)
        dense[m] = values
        out[name] = dense.reshape(shape)
    return out


def read_model_file(path: str | Path) -> State:
    """A dense state from a safetensors model file (plain, int8 or pruned: decoded)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    return unpack(load_file(str(path)), meta)


def load_init(model: torch.nn.Module, path: str | Path, key: str = "init-from") -> None:
    """Load ``path`` into ``model``, or raise one ConfigError line naming what differs."""
    try:
        state = read_model_file(path)
    except (OSError, DecodeError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ConfigError(f"run-config key {key!r}: cannot read {str(path)!r}: {exc}") from None
    want = model.state_dict()
    missing, extra = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    shapes = [k for k in want.keys() & state.keys() if tuple(want[k].shape)
              != tuple(state[k].shape)]
    if missing or extra or shapes:
        raise ConfigError(
            f"run-config key {key!r}: {str(path)!r} does not fit the model (missing "
            f"{missing[:3]}, unexpected {extra[:3]}, other shapes {sorted(shapes)[:3]})")
    model.load_state_dict({k: state[k].to(want[k].dtype) for k in want})


def zero_masks(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where float weights (ndim >= 2) are exactly zero: what ``sparse-training`` keeps."""
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.ndim >= 2:
            m = v == 0
            if bool(m.any()):
                out[k] = m
    return out


def mask_gradients(model: torch.nn.Module, zeros: Mapping[str, torch.Tensor]
                   ) -> list[torch.utils.hooks.RemovableHandle]:
    """Gradient hooks that keep the ``zeros`` entries of ``model``'s parameters at zero
    under SGD (momentum, weight decay) and Adam alike; remove them after training."""
    hooks = []
    for name, p in model.named_parameters():
        m = zeros.get(name)
        if m is not None:
            keep = (~m).to(device=p.device, dtype=p.dtype)
            hooks.append(p.register_hook(lambda g, keep=keep: g * keep))
    return hooks
