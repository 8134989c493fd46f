"""Labelled arrays: the one in-memory form every data set takes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedslim.errors import DataError


@dataclass(frozen=True)
class ArrayData:
    """Inputs ``x`` (N, C, H, W) float32 and integer labels ``y`` (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> ArrayData:
        return ArrayData(self.x[idx], self.y[idx])

    def tensors(self, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.x).to(device),
                torch.from_numpy(self.y.astype(np.int64)).to(device))
