"""The seed's image augmentation: random integer shifts with edge pixels repeated, then random
horizontal flips.

The seed (Keras ``ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1,
fill_mode="nearest", horizontal_flip=True)``) draws a continuous shift, ``U(-0.1, 0.1) * size``
pixels, and resamples with bilinear interpolation. We draw INTEGER shifts uniformly in
``[-m, +m]`` with ``m = floor(0.1 * size + 0.5)`` (3 pixels for 32, 3 for 28, 1 for 8) and copy
pixels, so the images stay exact (uint8 stays uint8) and the shift is one gather. The range of
shifts is the seed's; only the sub-pixel part is dropped.

Definition (both implementations below follow it; tests check them against explicit indexing):
for a shift ``(dy, dx)`` and a flip bit, the output pixel ``(i, j)`` is

    j' = W - 1 - j if flip else j
    out[c, i, j] = img[c, clamp(i - dy, 0, H - 1), clamp(j' - dx, 0, W - 1)]

i.e. the content moves ``dy`` pixels down and ``dx`` right, the border row/column is repeated into
the uncovered strip (replicate padding), and the flip happens after the shift (Keras' order).

Two implementations with the same distribution:

- :func:`shift_flip` / :func:`random_shift_flip`: batched, on any device, no per-sample Python
  (one clamped gather); the resident (on-device) loader uses these.
- :class:`RandomShiftFlip`: per-sample (numpy edge-pad, crop, flip), the reference path of the
  ordinary ``torch.utils.data.DataLoader``. numpy, not torch ops, on purpose: one 32x32 image is
  far too small for intra-op threads, and on a busy CPU torch's thread sync made each sample
  ~60x slower (5 ms instead of 80 us, measured on this 2-core machine).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RandomShiftFlip",
    "max_shift_for",
    "random_shift_flip",
    "sample_shift_flip",
    "shift_flip",
]


def max_shift_for(size: Sequence[int], fraction: float = 0.1) -> tuple[int, ...]:
    """Largest integer shift per spatial axis: ``floor(fraction * n + 0.5)`` for each size ``n``.

    Example: ``max_shift_for((32, 32)) == (3, 3)``, ``max_shift_for((28, 28)) == (3, 3)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"shift fraction must be in [0, 1), got {fraction}")
    return tuple(math.floor(fraction * n + 0.5) for n in size)


def _check_max_shift(max_shift: Sequence[int]) -> tuple[int, int]:
    if len(max_shift) != 2 or any(int(m) != m or m < 0 for m in max_shift):
        raise ValueError(
            f"max_shift must be two non-negative ints (height, width), got {tuple(max_shift)}"
        )
    return int(max_shift[0]), int(max_shift[1])


def sample_shift_flip(
    n: int,
    max_shift: Sequence[int],
    *,
    flip_prob: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw ``n`` augmentation parameters on ``device``.

    Returns:
        shifts: ``(n, 2)`` int64, ``(dy, dx)``, each uniform on ``[-max_shift, +max_shift]``.
        flips: ``(n,)`` bool, True with probability ``flip_prob``.
    """
    my, mx = _check_max_shift(max_shift)
    dy = torch.randint(-my, my + 1, (n,), generator=generator, device=device)
    dx = torch.randint(-mx, mx + 1, (n,), generator=generator, device=device)
    flips = torch.rand(n, generator=generator, device=device) < flip_prob
    return torch.stack([dy, dx], dim=1), flips


def shift_flip(images: Tensor, shifts: Tensor, flips: Tensor) -> Tensor:
    """Shift each image by its ``(dy, dx)`` with edges repeated, then flip it horizontally if asked.

    One gather with clamped indices; clamping an index to the border IS replicate padding, so no
    padded copy is made. Works on any dtype (uint8 stays exact) and device.

    Args:
        images: ``(B, C, H, W)``.
        shifts: ``(B, 2)`` integer ``(dy, dx)``; positive moves the content down / right.
        flips: ``(B,)`` bool.

    Returns:
        ``(B, C, H, W)``, same dtype and device as ``images``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    if shifts.shape != (b, 2) or flips.shape != (b,):
        raise ValueError(
            f"shifts must be ({b}, 2) and flips ({b},), got {tuple(shifts.shape)} and "
            f"{tuple(flips.shape)}"
        )
    device = images.device
    shifts = shifts.to(device=device, dtype=torch.long)
    rows = (torch.arange(h, device=device) - shifts[:, :1]).clamp_(0, h - 1)  # (B, H)
    cols = torch.arange(w, device=device).expand(b, w)
    # Flip after the shift: output column j reads the shifted column W - 1 - j.
    cols = torch.where(flips.to(device)[:, None], cols.flip(1), cols)
    cols = (cols - shifts[:, 1:]).clamp_(0, w - 1)  # (B, W)
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def random_shift_flip(
    images: Tensor,
    max_shift: Sequence[int],
    *,
    flip_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`shift_flip` with parameters from :func:`sample_shift_flip` (drawn on the images'
    device). ``images (B, C, H, W)`` -> ``(B, C, H, W)``."""
    shifts, flips = sample_shift_flip(
        images.shape[0], max_shift, flip_prob=flip_prob, generator=generator, device=images.device
    )
    return shift_flip(images, shifts, flips)


class RandomShiftFlip:
    """Per-sample version of :func:`random_shift_flip` (the DataLoader reference path).

    Edge-pads the image by the largest shift (numpy ``mode="edge"``), crops the window the shift
    selects, then flips. Same distribution as the batched path: ``dy``, ``dx`` uniform integers in
    ``[-max_shift, +max_shift]``, flip with probability ``flip_prob``.

    Args:
        max_shift: ``(max_dy, max_dx)`` in pixels.
        flip_prob: probability of a horizontal flip.

    Call:
        ``image (C, H, W)`` CPU tensor of any dtype, optional ``torch.Generator`` ->
        ``(C, H, W)``, same dtype (uint8 stays exact).
    """

    def __init__(self, max_shift: Sequence[int], flip_prob: float = 0.5) -> None:
        self.max_shift = _check_max_shift(max_shift)
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.flip_prob = flip_prob

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if image.ndim != 3:
            raise ValueError(f"image must be (C, H, W), got shape {tuple(image.shape)}")
        my, mx = self.max_shift
        h, w = image.shape[-2:]
        dy = int(torch.randint(-my, my + 1, (1,), generator=generator))
        dx = int(torch.randint(-mx, mx + 1, (1,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < self.flip_prob)
        padded = np.pad(image.numpy(), ((0, 0), (my, my), (mx, mx)), mode="edge")
        # Output row i reads input row i - dy, which sits at padded row i - dy + my.
        out = padded[:, my - dy : my - dy + h, mx - dx : mx - dx + w]
        if flip:
            out = out[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(out))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_shift={self.max_shift}, flip_prob={self.flip_prob})"
