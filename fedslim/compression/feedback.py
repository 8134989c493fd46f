"""Error feedback: what compression dropped this round is added to the next round's update.

Top-k and biased quantizers lose information every round; accumulating the loss locally and
re-injecting it (Seide et al. 2014; Stich et al. 2018; DGC) turns the loss into a delay, so the
sum of everything ever sent plus the residual still held equals the sum of all true updates.
The residual is the only state, kept apart from the (pure) codecs and serialisable as plain
tensors, so a Flower client can store it in ``context.state`` between rounds::

    ef = ErrorFeedback.from_state(saved)          # or ErrorFeedback()
    corrected = ef.apply(update)
    payload, sent = encode_update(corrected, spec, return_reconstruction=True)
    ef.record(corrected, sent)
    saved = ef.state_dict()
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedslim.compression import buffers
from fedslim.compression.buffers import all_finite
from fedslim.errors import DecodeError, EncodeError


class ErrorFeedback:
    """Per-tensor residuals ``corrected - sent``, in float32, on the update's device."""

    def __init__(self) -> None:
        self._residual: dict[str, torch.Tensor] = {}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor],
                   device: str | torch.device | None = None, copy: bool = True
                   ) -> ErrorFeedback:
        """Rebuild from :meth:`state_dict` output (optionally moving residuals to ``device``).

        ``copy=False`` adopts the tensors themselves when no conversion is needed (for a
        state nobody else holds, e.g. just loaded from a file): no model-sized copy.

        Raises
        ------
        DecodeError
            If an entry is not a finite floating-point tensor.
        """
        ef = cls()
        for name, value in state.items():
            if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
                raise DecodeError(f"error-feedback state {name!r} is not a float tensor")
            residual = value.detach().to(device=device, dtype=torch.float32)
            if not all_finite(residual):
                raise DecodeError(f"error-feedback state {name!r} holds NaN/Inf")
            ef._residual[str(name)] = residual.clone() if copy else residual
        return ef

    def apply(self, update: Mapping[str, torch.Tensor], in_place: bool = False
              ) -> dict[str, torch.Tensor]:
        """``update + residual`` per tensor (float32; the residual is zero for new names).

        ``in_place=True`` adds the residual inside ``update``'s float32 tensors and returns
        them -- no model-sized allocation -- for a caller that owns them (e.g. a fresh
        ``local - global``); other dtypes are converted into fresh tensors as usual.

        Raises
        ------
        EncodeError
            If a tensor's shape differs from its stored residual's (the model changed).
        """
        out: dict[str, torch.Tensor] = {}
        for name, tensor in update.items():
            owned = in_place and tensor.dtype == torch.float32
            value = tensor.detach().to(torch.float32)
            residual = self._residual.get(name)
            if residual is None:
                out[name] = value if owned else value.clone()
                continue
            if residual.shape != value.shape:
                raise EncodeError(f"tensor {name!r} has shape {tuple(value.shape)} but its "
                                  f"error-feedback residual has {tuple(residual.shape)}")
            residual = residual.to(value.device)
            out[name] = value.add_(residual) if owned else torch.add(
                value, residual, out=buffers.like(value))
        return out

    def record(self, corrected: Mapping[str, torch.Tensor],
               sent: Mapping[str, torch.Tensor], in_place: bool = False) -> None:
        """Store ``corrected - sent``; a name missing from ``sent`` keeps all of ``corrected``.

        ``corrected`` is what :meth:`apply` returned and ``sent`` what the receiver decodes
        (``encode_update(..., return_reconstruction=True)``). Residuals of names absent from
        ``corrected`` are kept untouched for a later round. ``in_place=True`` subtracts
        inside ``corrected``'s (float32) tensors and keeps them as the residuals -- no
        model-sized allocation -- for a caller that no longer needs them.
        """
        for name, value in corrected.items():
            value = value.detach()
            fresh = not (in_place and value.dtype == torch.float32)
            value = value.to(torch.float32)
            got = sent.get(name)
            if got is None:
                self._residual[name] = value.clone() if fresh else value
                continue
            if got.shape != value.shape:
                raise EncodeError(f"tensor {name!r}: sent shape {tuple(got.shape)} differs "
                                  f"from corrected shape {tuple(value.shape)}")
            got = got.detach().to(value.device, torch.float32)
            self._residual[name] = value - got if fresh else value.sub_(got)

    def residual(self, name: str) -> torch.Tensor | None:
        """The residual held for ``name`` (None if never recorded)."""
        return self._residual.get(name)

    def reset(self) -> None:
        """Forget all residuals (e.g. when the model architecture changes)."""
        self._residual.clear()

    def residuals(self) -> dict[str, torch.Tensor]:
        """The residuals themselves (no copy; read-only: e.g. to serialize them)."""
        return dict(self._residual)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Residuals as CPU float32 tensors keyed by tensor name (fit for an ArrayRecord)."""
        return {name: r.detach().cpu().clone() for name, r in self._residual.items()}

    def __len__(self) -> int:
        return len(self._residual)
