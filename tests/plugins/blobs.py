"""A plug-in: the data set and model of tests/apps.py's quickstart app, by name."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedslim.config import DataConfig
from fedslim.task.arrays import ArrayData
from fedslim.task.datasets import Loaded, register_dataset
from fedslim.task.models import register_model
from tests.apps import Net, load_data


@register_dataset("blobs")
def blobs(cfg: DataConfig, seed: int) -> Loaded:
    xs, ys = zip(*(load_data(100 + i) for i in range(8)), strict=True)
    x, y = torch.cat(xs).numpy(), torch.cat(ys).numpy()
    return Loaded(ArrayData(x.astype(np.float32), y.astype(np.int64)))


@register_model("blobs_net")
def blobs_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    assert input_shape == (16,) and num_classes == 4, (input_shape, num_classes)
    return Net()
