"""Generated and derived data sets of other shapes than 8x8 digits (no download).

* :func:`upsample_digits` -- scikit-learn's digits as 3x32x32 images (CIFAR's shape), for
  conv nets written for CIFAR such as Flower's quickstart ``Net``;
* :func:`make_motifs` -- a 1-D sequence task where the ORDER of two shapes is the class, so
  a model must keep track of where along the sequence a feature was found.

They are registered as ``dataset=digits32`` and ``dataset=motifs`` in
:mod:`fedslim.task.datasets`.
"""

from __future__ import annotations

from itertools import permutations

import numpy as np

from fedslim.task.arrays import ArrayData

MOTIF_LENGTH = 16
SEQUENCE_LENGTH = 96


def upsample_digits(pool: ArrayData, size: int = 32) -> ArrayData:
    """(N, 1, 8, 8) images in [0, 1] -> (N, 3, size, size), bilinear, normalized to [-1, 1]
    per channel as Flower's quickstart normalizes CIFAR (mean 0.5, std 0.5)."""
    import torch
    from torch.nn import functional

    x = torch.from_numpy(pool.x)
    up = functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    up = (up.clamp(0.0, 1.0) - 0.5) / 0.5
    return ArrayData(np.ascontiguousarray(up.expand(-1, 3, -1, -1).numpy()), pool.y)


def motif_shapes(length: int = MOTIF_LENGTH) -> np.ndarray:
    """The four shapes (4, length): a two-cycle sine burst, a ramp, a bump and a two-level
    square wave."""
    t = np.linspace(0.0, 1.0, length, endpoint=False)
    return np.stack([
        np.sin(2 * np.pi * 2 * t),
        2 * t - 1,
        1.5 * np.exp(-((t - 0.5) ** 2) / 0.02) - 0.3,
        np.where((t * 4).astype(int) % 2 == 0, 1.0, -1.0),
    ]).astype(np.float32)


def motif_pairs() -> list[tuple[int, int]]:
    """Class c is the ordered pair (first shape, second shape) ``motif_pairs()[c]``: 10 of
    the 12 ordered pairs of two different shapes."""
    return [pair for pair in permutations(range(4), 2)][:10]


def make_motifs(num_samples: int, seed: int, length: int = SEQUENCE_LENGTH,
                noise: float = 0.3, drift: float = 0.02) -> ArrayData:
    """Sequences (N, 1, length): white noise (``noise`` sd) on a random walk (``drift`` sd
    per step), the class's first shape somewhere in the first half and its second shape
    somewhere in the second half, each at a random amplitude in [0.7, 1.3]. The label is
    the ordered pair (10 classes): "ramp then bump" is another class than "bump then ramp".
    """
    rng = np.random.default_rng(seed)
    shapes, pairs = motif_shapes(), np.asarray(motif_pairs())
    width = shapes.shape[1]
    y = rng.integers(0, len(pairs), num_samples)
    x = rng.normal(0.0, noise, (num_samples, 1, length)).astype(np.float32)
    x += np.cumsum(rng.normal(0.0, drift, (num_samples, 1, length)), axis=2).astype(np.float32)
    starts = np.stack([rng.integers(0, length // 2 - width, num_samples),
                       rng.integers(length // 2, length - width, num_samples)], axis=1)
    amp = rng.uniform(0.7, 1.3, (num_samples, 2)).astype(np.float32)
    cols = np.arange(width)
    rows = np.arange(num_samples)[:, None]
    for slot in range(2):
        x[rows, 0, starts[:, slot:slot + 1] + cols] += (amp[:, slot:slot + 1]
                                                       * shapes[pairs[y, slot]])
    return ArrayData(x, y.astype(np.int64))
