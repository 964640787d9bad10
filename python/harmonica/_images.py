"""Image grids shared by the reports and ``harmonica sample``."""

from __future__ import annotations

import math

import torch


def tile(images: torch.Tensor, columns: int, gap: int) -> torch.Tensor:
    """``[N, C, H, W]`` in [0, 1] as one white-backed ``[C, H', W']`` grid, ``columns`` per row,
    ``gap`` pixels between and around the images."""
    n, c, h, w = images.shape
    rows = math.ceil(n / columns)
    grid = torch.ones(c, rows * (h + gap) + gap, columns * (w + gap) + gap, dtype=images.dtype)
    for i in range(n):
        r, col = divmod(i, columns)
        y, x = gap + r * (h + gap), gap + col * (w + gap)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid
