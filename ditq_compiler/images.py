"""Sample grids as PNG, for models whose samples are images (1 or 3 channels in [-1, 1])."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_uint8(samples: torch.Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> ``[N, H, W, C]`` uint8."""
    images = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


def save_grid(samples: torch.Tensor, path: str | Path, labels: list[int] | None = None, scale: int = 4,
              columns: int | None = None) -> None:
    from PIL import Image

    images = to_uint8(samples)
    count, height, width, channels = images.shape
    columns = columns or min(count, 8)
    rows = math.ceil(count / columns)
    pad = 2
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), 255, np.uint8)
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top:top + height, left:left + width] = image
    picture = Image.fromarray(grid[..., 0] if channels == 1 else grid)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)
