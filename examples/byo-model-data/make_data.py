"""Make up a non-image data set: 3-axis vibration windows from machines in 4 states.

    python make_data.py [--out data] [--train 3000] [--test 800]

Writes ``train.npz`` and ``test.npz`` with ``x`` of shape (N, 64, 3) -- 64 time steps of
3 accelerometer axes, channels LAST, raw float32 values in g -- and ``y`` (N,) in 0..3:
healthy, imbalance (strong 1x rotation frequency), misalignment (2x), bearing fault
(bursts of a high frequency). Each window has its own rotation speed, phase, gain and
noise, so the classes overlap a little. Invented for the docs; tuned to nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def windows(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(64) / 64.0
    y = rng.integers(0, 4, n)
    speed = rng.uniform(3.0, 6.0, (n, 1, 1))            # rotations per window
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 3))
    gain = rng.uniform(0.5, 1.5, (n, 1, 3))
    base = 0.2 * np.sin(2 * np.pi * speed * t[None, :, None] + phase)
    one_x = np.sin(2 * np.pi * speed * t[None, :, None] + phase)
    two_x = np.sin(4 * np.pi * speed * t[None, :, None] + 2 * phase)
    burst = np.sin(2 * np.pi * 25 * t)[None, :, None] * (rng.random((n, 64, 1)) < 0.15)
    x = base.copy()
    x[y == 1] += 0.6 * one_x[y == 1]
    x[y == 2] += 0.5 * two_x[y == 2]
    x[y == 3] += 0.8 * burst[y == 3]
    x = gain * x + rng.normal(0, 0.35, x.shape) + rng.normal(0, 0.2, (n, 1, 3))  # noise, offset
    return x.astype(np.float32), y.astype(np.int64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("data"))
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=800)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", args.train), ("test", args.test)):
        x, y = windows(n, rng)
        np.savez(args.out / f"{name}.npz", x=x, y=y)
        print(f"wrote {args.out / name}.npz: x {x.shape} {x.dtype}, y {y.shape}")


if __name__ == "__main__":
    main()
