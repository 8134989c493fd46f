"""Post-training int8 quantization of a state dict, for exporting a compact model.

Weights (float tensors with ``ndim >= 2``) are stored as int8 with one symmetric scale per
output channel (row 0 of the weight): per-channel scales follow each filter's own range,
which loses far less accuracy than one scale per tensor at the same size. Biases and norm
parameters are tiny and accuracy-sensitive, so they stay float32. The result is a flat
``{name: tensor}`` dict of contiguous CPU tensors that ``safetensors`` can save as is:

* ``<name>``           int8, the original shape;
* ``<name>.__scale__`` float32, shape ``[shape[0]]``: ``weight ~= q * scale`` per row.

An int8 tensor with ``ndim >= 2`` therefore always means "quantized", and its scale must be
present; the decoder checks every scale before using it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedslim.errors import DecodeError, EncodeError

SCALE_SUFFIX = ".__scale__"
QMAX = 127  # symmetric range [-127, 127]: -128 is left unused so that q and -q both fit


def _is_quantizable(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.ndim >= 2


def quantize_state_int8(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Quantize the weights of ``state`` to per-output-channel symmetric int8.

    ``scale = max|row| / 127`` per output channel, ``q = round(w / scale)``, so every
    element is reconstructed within ``scale / 2``. An all-zero row gets ``scale = 1``
    (its ``q`` is all zeros) instead of 0, which keeps the decoder free of division and
    NaN (likewise a subnormal row whose scale would underflow to 0). Float tensors with
    ``ndim < 2`` become float32; other dtypes are copied unchanged.

    Raises
    ------
    EncodeError
        If a weight holds NaN/Inf, a name ends with the reserved ``.__scale__`` suffix, or
        the input already holds an int8 tensor with ``ndim >= 2`` (the decoder would take
        it for a quantized weight).
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX):
            raise EncodeError(f"tensor name {name!r} ends with the reserved suffix "
                              f"{SCALE_SUFFIX!r}")
        t = t.detach().cpu()
        if t.dtype == torch.int8 and t.ndim >= 2:
            raise EncodeError(f"tensor {name!r} is already int8 with shape {tuple(t.shape)}; "
                              "it would be mistaken for a quantized weight")
        if not _is_quantizable(t):
            # clone: safetensors refuses tensors that share storage
            out[name] = (t.float() if t.is_floating_point() else t).contiguous().clone()
            continue
        rows = t.float().flatten(1)
        if not torch.isfinite(rows).all():
            raise EncodeError(f"tensor {name!r} holds NaN or Inf; cannot quantize")
        amax = rows.abs().amax(dim=1) if rows.shape[1] else torch.zeros(len(rows))
        scale = amax / QMAX
        # all-zero rows (and subnormal ones whose scale underflows to 0) get scale 1
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(rows / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
        out[name] = q.reshape(t.shape).contiguous()
        out[name + SCALE_SUFFIX] = scale.to(torch.float32).contiguous()
    return out


def dequantize_state_int8(q: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rebuild a float32 state dict from :func:`quantize_state_int8`'s output.

    The result has exactly the original names, so ``model.load_state_dict(..., strict=True)``
    accepts it. Each scale is validated (present, floating, shape ``[rows]``, finite and
    positive) before use, so a corrupted or hand-made file fails loudly instead of loading
    NaN weights.

    Raises
    ------
    DecodeError
        If a quantized weight's scale is missing, has the wrong shape or dtype, or is not
        finite and positive; or if a ``.__scale__`` entry has no int8 weight to belong to
        (a name collision or a stray entry).
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in q.items():
        if name.endswith(SCALE_SUFFIX):
            base = name[: -len(SCALE_SUFFIX)]
            owner = q.get(base)
            if owner is None or owner.dtype != torch.int8 or owner.ndim < 2:
                raise DecodeError(f"scale {name!r} has no int8 weight {base!r} to belong to "
                                  "(stray entry or name collision)")
            continue
        if not (t.dtype == torch.int8 and t.ndim >= 2):
            out[name] = t.float() if t.is_floating_point() else t
            continue
        scale = q.get(name + SCALE_SUFFIX)
        rows = t.shape[0]
        if scale is None:
            raise DecodeError(f"int8 tensor {name!r} has no scale {name + SCALE_SUFFIX!r}")
        if not scale.is_floating_point() or tuple(scale.shape) != (rows,):
            raise DecodeError(f"scale of {name!r} must be a float tensor of shape [{rows}], "
                              f"got {scale.dtype} {list(scale.shape)}")
        scale = scale.to(device=t.device, dtype=torch.float32)
        if not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise DecodeError(f"scale of {name!r} holds non-finite or non-positive values")
        out[name] = (t.float().flatten(1) * scale[:, None]).reshape(t.shape)
    return out
