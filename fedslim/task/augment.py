"""Input augmentations for small images: Gaussian noise and small random shifts.

Vectorised over the batch (one ``torch.roll`` per distinct shift, at most 9), and driven by
an explicit ``torch.Generator`` so that training stays reproducible.
"""

from __future__ import annotations

import torch

from fedslim.config import Augment


def add_noise(x: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype)
    return x + std * noise.to(x.device)


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift every image by up to ``max_shift`` pixels in each direction (zero fill)."""
    n = x.shape[0]
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=gen,
                           device=gen.device).to(x.device)
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    h, w = x.shape[-2:]
    out = torch.empty_like(x)
    # One gather per distinct (dy, dx): at most (2*max_shift+1)^2 slices, never per element.
    codes = (shifts[:, 0] + max_shift) * (2 * max_shift + 1) + (shifts[:, 1] + max_shift)
    for code in torch.unique(codes).tolist():
        dy, dx = divmod(int(code), 2 * max_shift + 1)
        sel = codes == code
        out[sel] = padded[sel, :, dy:dy + h, dx:dx + w]
    return out


def augment(x: torch.Tensor, mode: Augment, gen: torch.Generator,
            noise_std: float = 0.1, max_shift: int = 1) -> torch.Tensor:
    """Apply the configured augmentation to a batch (returns ``x`` itself for ``none``).

    Shifts apply to images (N, C, H, W) only; other shapes (vectors, sequences) get the
    noise part alone.
    """
    if mode in (Augment.SHIFT, Augment.NOISE_SHIFT) and x.ndim == 4:
        x = random_shift(x, max_shift, gen)
    if mode in (Augment.NOISE, Augment.NOISE_SHIFT):
        x = add_noise(x, noise_std, gen)
    return x
